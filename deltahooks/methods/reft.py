"""LoReFT (Wu et al., 2024): ``h ← h + Rᵀ(Wh + b − Rh)`` at chosen token positions.

An output site on any module whose output (or its first element: decoder layers return
tuples) is a ``(..., sequence, hidden)`` hidden state. ``R`` (rank × hidden) has
orthonormal rows by construction: it is computed on every call from an unconstrained
tensor with the Householder map of ``torch.nn.utils.parametrizations.orthogonal``
(without its trivialization buffer), so the stored tensors alone determine ``R`` and
any optimizer step keeps it orthonormal. The update depends on the token position, so
it cannot be merged into weights.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..errors import SpecError, UnsupportedModuleError
from ..layers import hidden_width, output_width
from ..sites import OutputSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options

INITS = ("default", "identity")
POSITIONS = re.compile(r"(?:f(?P<first>[0-9]+))?\+?(?:l(?P<last>[0-9]+))?")


def parse_positions(positions: object) -> tuple[int, int]:
    """pyreft's ``"f<n>+l<n>"`` syntax → ``(first n, last n)``.

    Example:
        >>> parse_positions("f5+l3"), parse_positions("l1")
        ((5, 3), (0, 1))
    """
    match = POSITIONS.fullmatch(positions) if isinstance(positions, str) else None
    ok = (
        match is not None
        and (match["first"] or match["last"])
        and ("+" in positions) == bool(match["first"] and match["last"])
    )
    first, last = (int(match[k] or 0) for k in ("first", "last")) if ok else (0, 0)
    if not ok or (match["first"] and first == 0) or (match["last"] and last == 0):
        raise SpecError(
            f"ReFT positions={positions!r} is not pyreft's position syntax; use 'f<n>+l<n>' "
            "(the first n and last n tokens, e.g. 'f5+l5'), 'f<n>' or 'l<n>', with n >= 1"
        )
    return first, last


def rotation(raw: torch.Tensor) -> torch.Tensor:
    """``R`` (rank × hidden, orthonormal rows) from its stored ``hidden × rank`` tensor.

    torch's Householder map (``orthogonal(..., orthogonal_map="householder",
    use_trivialization=False)``): the entries below the diagonal of ``raw`` are the
    Householder vectors and the signs of its diagonal flip columns. A diagonal entry
    counts as ``+1`` unless negative (torch truncates it to an int, so weight decay
    shrinking it below 1 would zero a row of ``R``); any ``raw`` gives orthonormal rows.
    Computed in at least float32 (no Householder kernel for half precision).
    """
    exact = raw.to(torch.promote_types(raw.dtype, torch.float32))
    vectors = exact.tril(-1)
    tau = 2.0 / (1.0 + (vectors * vectors).sum(dim=-2))
    q = torch.linalg.householder_product(vectors, tau)
    signs = torch.where(exact.diagonal() < 0, -1.0, 1.0).to(q.dtype)
    return (q * signs.unsqueeze(-2)).mT


@torch.no_grad()
def householder_code(q: torch.Tensor) -> torch.Tensor:
    """The ``raw`` tensor whose :func:`rotation` is ``q.T``, for ``q`` (hidden × rank)
    with orthonormal columns: torch's ``right_inverse`` of the Householder map."""
    code, tau = torch.geqrf(q)
    diagonal = code.diagonal()
    diagonal.sign_()
    diagonal[tau == 0] *= -1  # LAPACK skips a reflection where tau is 0; the map always reflects
    return code


@torch.no_grad()
def _initialise(raw: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, init: str) -> None:
    # In float32 on the CPU: QR has no half-precision kernel, and one generator makes the
    # start the same on every device.
    q = torch.empty(raw.shape, dtype=torch.float32)
    nn.init.orthogonal_(q)  # pyreft: LowRankRotateLayer(init_orth=True)
    raw.copy_(householder_code(q))
    if init == "identity":
        weight.copy_(rotation(raw))
        bias.zero_()
        return
    # pyreft's learned_source is an nn.Linear(hidden, rank): its default initialisation
    w = torch.empty(weight.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(weight.shape[1])
    weight.copy_(w)
    bias.copy_(torch.empty(bias.shape, dtype=torch.float32).uniform_(-bound, bound))


def loreft(h: torch.Tensor, rotation_rows: torch.Tensor, weight, bias) -> torch.Tensor:
    """``h + Rᵀ(Wh + b − Rh)``, with ``(W − R)h + b`` in one product (exactly zero for the
    identity start, where ``W = R`` and ``b = 0``)."""
    r = rotation_rows.to(h.dtype)
    return h + F.linear(F.linear(h, weight - r, bias), r.mT)


def intervene(first: int, last: int, dropout: float, module: nn.Module, x, y, tensors, writable):
    """LoReFT on the first ``first`` and last ``last`` positions of dimension -2 of ``y``;
    a position in both ranges is intervened once, the others are returned as they were."""
    raw, weight, bias = tensors
    if y.dim() < 2 or y.shape[-1] != weight.shape[1]:
        raise UnsupportedModuleError(
            f"ReFT needs a (..., sequence, {weight.shape[1]}) output, but "
            f"{type(module).__name__} returned shape {tuple(y.shape)}; target a module whose "
            "output is a sequence of hidden states, hidden last (not channels first)"
        )
    length = y.shape[-2]
    head = min(first, length)
    tail = min(last, length - head)
    chosen = torch.cat([y[..., :head, :], y[..., length - tail :, :]], dim=-2)
    new = loreft(chosen, rotation(raw), weight, bias)
    if dropout:
        new = F.dropout(new, dropout, module.training)
    if head + tail == length:
        return new
    middle = y[..., head : length - tail, :]
    return torch.cat([new[..., :head, :], middle, new[..., head:, :]], dim=-2)


@register_method
@dataclass(frozen=True, kw_only=True)
class ReFT(DeltaSpec):
    """LoReFT: a low-rank intervention on the hidden state at a few token positions.

    LoReFT (Wu et al., 2024, "ReFT: Representation Finetuning for Language Models"; the
    ``pyreft`` library's ``LoreftIntervention``) edits the hidden state ``h`` of each
    target's output at the chosen positions only: ``h + Rᵀ(Wh + b − Rh)``, where ``R``
    (rank × hidden) has orthonormal rows and ``W`` (rank × hidden), ``b`` (rank) are
    free. It replaces the part of ``h`` in the subspace spanned by ``R`` with
    ``Wh + b``. Other positions pass through untouched, bit for bit. The base model is
    frozen; targets are usually whole transformer layers (pyreft's ``block_output``:
    ``targets="re:.*layers\\.\\d+"`` on Llama, ``"re:.*encoder\\.layer\\.\\d+"`` on BERT;
    a glob such as ``"layers.*"`` would also match every submodule of the layers), but
    any module whose output is ``(..., sequence, hidden)`` works.

    ``R`` is never stored: the delta stores ``reft_R_householder`` (hidden × rank), the
    unconstrained tensor of ``torch.nn.utils.parametrizations.orthogonal`` with
    ``orthogonal_map="householder"`` and ``use_trivialization=False`` (Householder
    vectors below the diagonal, signs on it), and computes ``R`` from it on every call
    (:func:`rotation`). So ``R`` stays orthonormal after any optimizer step (weight
    decay included), and a saved file reproduces it exactly. pyreft uses torch's
    default ``use_trivialization=True``, whose extra hidden × hidden buffer per target
    would not fit a small delta file; both draw the starting ``R`` with
    ``torch.nn.init.orthogonal_``.
    ``delta.merge()`` raises :class:`deltahooks.UnsupportedOperationError`: the update
    depends on the token position. Every argument is keyword-only and checked when the
    spec is created.

    Args:
        targets: the modules whose output is intervened on, in the target syntax of
            :func:`deltahooks.attach`. Required. pyreft: ``representations[*].layer``
            with ``component="block_output"``. The output (or its first element, for a
            tuple) must have at least two dimensions; a module that returns something
            else raises :class:`deltahooks.UnsupportedModuleError` at its first forward.
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.
        positions: which token positions of the sequence dimension (dimension -2 of
            ``h``) are intervened on, in pyreft's syntax: ``"f<n>+l<n>"`` (the first n
            and the last n), ``"f<n>"`` or ``"l<n>"``, n >= 1. Default ``"f5+l5"``.
            Positions count over the whole sequence each forward call sees, padding
            included (a module's output carries no attention mask): with right padding
            ``l<n>`` lands on pads of the shorter rows, with left padding ``f<n>`` does.
            A sequence shorter than first + last is intervened once at every position
            (pyreft caps each side at half the prompt instead). During ``generate()``
            with a KV cache each decoding step is a sequence of one token, which is
            both first and last, so every generated token is intervened too; pyreft
            intervenes on the prompt only (see the Example for how to do that here).
        rank: the rank of the intervention (rows of ``R`` and ``W``), a positive integer
            no larger than the hidden size (else :class:`deltahooks.SpecError` at
            attach). Default ``4``. Paper: ``r``; pyreft: ``low_rank_dimension``. The
            delta has ``2 · rank · hidden + rank`` parameters per target.
        hidden_size: the width of the target's hidden state. Default ``None``: from the
            module (:func:`deltahooks.layers.hidden_width`: the layer's own width, else
            its last Linear's output width, else the model's ``config.hidden_size``).
            Needed for a module none of these describes.
        dropout: dropout probability in ``[0, 1)`` on the intervened hidden state, as
            in pyreft (applied to ``h + Rᵀ(...)`` at the chosen positions, so the base
            part of those positions is dropped too), in training mode only. Default
            ``0.0``. pyreft: ``dropout``.
        init: how the delta starts. ``"default"``, pyreft's: ``R`` a random orthogonal
            matrix (``torch.nn.init.orthogonal_``), ``W`` and ``b`` as a fresh
            ``nn.Linear(hidden, rank)``; the outputs change at attach (LoReFT has no
            identity start). ``"identity"``: the same ``R``, then ``W = R`` and
            ``b = 0``, so ``Wh + b − Rh`` is exactly zero and the outputs are unchanged
            at attach (pyreft's ``LoreftIntervention_IdentityInit``), except that
            dropout still acts in training mode. Default ``"default"``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8))
        >>> delta = dh.attach(model, dh.ReFT(targets=["0"], positions="f1+l1", rank=2))
        >>> sorted(delta.state_dict())
        ['0.reft_R_householder', '0.reft_W', '0.reft_b']
        >>> x = torch.randn(1, 5, 8)
        >>> with delta.disabled():
        ...     base = model(x)
        >>> changed = (model(x) != base).any(-1)[0]
        >>> changed.tolist()  # the first and the last of 5 positions
        [True, False, False, False, True]

        To intervene on the prompt only during cached generation, as pyreft does, run
        the prompt with the delta on and the decoding steps with it off::

            first = model(prompt, use_cache=True)
            token = first.logits[:, -1:].argmax(-1)
            with delta.disabled():
                out = model.generate(torch.cat([prompt, token], 1),
                                     past_key_values=first.past_key_values, ...)
    """

    method = "reft"
    reads_weights = False
    positions: str = "f5+l5"
    rank: int = 4
    hidden_size: int | None = None
    dropout: float = 0.0
    init: Literal["default", "identity"] = "default"

    def validate(self) -> None:
        parse_positions(self.positions)
        validate.positive_int(self, "rank", self.rank, example=4)
        validate.optional_positive_int(self, "hidden_size", self.hidden_size, example=768)
        validate.probability(self, "dropout", self.dropout)
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        known = output_width(module)
        if self.hidden_size is not None and known is not None and self.hidden_size != known:
            raise SpecError(
                f"ReFT hidden_size={self.hidden_size} does not fit {path!r} "
                f"({type(module).__name__}), whose output is {known} wide; drop hidden_size=... "
                "(it is read from the module)"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        width = hidden_width(path, module, root, self.hidden_size)
        if self.rank > width:
            raise SpecError(
                f"ReFT rank={self.rank} is larger than the hidden size {width} of {path!r}: R "
                f"cannot have more orthonormal rows than dimensions; use rank <= {width}"
            )
        opts = tensor_options(module, device)
        raw = torch.empty(width, self.rank, **opts)
        weight = torch.empty(self.rank, width, **opts)
        bias = torch.empty(self.rank, **opts)
        if self.real_build(device):
            _initialise(raw, weight, bias, self.init)
        first, last = parse_positions(self.positions)
        site = OutputSite(
            partial(intervene, first, last, float(self.dropout)),
            ("reft_R_householder", "reft_W", "reft_b"),
        )
        return Part(
            path,
            {"reft_R_householder": raw, "reft_W": weight, "reft_b": bias},
            [site],
            cannot_merge="a ReFT intervention acts on chosen token positions only, which no "
            "change of weights can express",
        )
