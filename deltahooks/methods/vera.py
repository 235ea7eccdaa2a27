"""VeRA (Kopiczko et al., 2024): ``y = f(x) + Λ_b B Λ_d A x`` with ``A``, ``B`` frozen and random.

One pair of random projections, ``A`` (r × widest fan-in) and ``B`` (widest fan-out × r),
is shared by every target and never trained; each target trains two vectors,
``λ_d`` (r) and ``λ_b`` (fan-out), and uses the top-left corner of the projections that
fits its widths. The projections are drawn from ``projection_prng_key`` exactly as PEFT
draws them, so a file may leave them out and have them rebuilt at load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import validate
from ..direct_reads import WHY, needs_weight_site
from ..errors import SpecError, UnsupportedModuleError, warn
from ..layers import CONV1D_GPT2, LINEAR, kind_of, to_weight_layout, widths
from ..merging import stored
from ..sites import OutputSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, SharedTensor, register_method, tensor_options

INITS = ("default", "random")


def projections(r: int, fan_in: int, fan_out: int, key: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``A`` (r × fan_in) then ``B`` (fan_out × r), Kaiming-uniform (gain √2, fan = their
    second dimension) from one CPU generator seeded with ``key``: PEFT's draw, number for
    number, so a file may leave them out."""
    generator = torch.Generator(device="cpu").manual_seed(key)
    drawn = []
    for shape in ((r, fan_in), (fan_out, r)):
        bound = math.sqrt(3.0) * math.sqrt(2.0) / math.sqrt(shape[1])
        drawn.append(torch.empty(shape).uniform_(-bound, bound, generator=generator))
    return drawn[0], drawn[1]


def scaled_factors(fan_in: int, fan_out: int, tensors) -> tuple[torch.Tensor, torch.Tensor]:
    """``diag(λ_d) A`` and ``diag(λ_b) B``, cut to the layer's widths."""
    a, b, lambda_d, lambda_b = tensors
    return lambda_d[:, None] * a[:, :fan_in], lambda_b[:, None] * b[:fan_out]


def update(fan_in: int, fan_out: int, dropout: float, module: nn.Module, x, y, tensors, writable):
    """``y + λ_b ⊙ B(λ_d ⊙ A(dropout(x)))``; accumulated into ``y`` when ``writable``.

    While the vectors train, they scale the activations (as PEFT does), so backward needs
    no gradient GEMM for the frozen factors; otherwise they scale the (small) factors: the
    same numbers, with less work once a call has more tokens than the rank.
    """
    a, b, lambda_d, lambda_b = tensors
    if dropout and module.training:
        x = F.dropout(x, dropout, True)
    x = x.to(a.dtype)
    if torch.is_grad_enabled() and (lambda_d.requires_grad or lambda_b.requires_grad):
        new = F.linear(F.linear(x, a[:, :fan_in]) * lambda_d, b[:fan_out]) * lambda_b
        if writable and y.dtype == new.dtype:
            return y.add_(new)
        return (y.to(new.dtype) + new).to(y.dtype)
    down, up = scaled_factors(fan_in, fan_out, tensors)
    h = F.linear(x, down)
    h = h.reshape(-1, h.shape[-1])
    if writable and y.dtype == h.dtype:
        y.view(-1, y.shape[-1]).addmm_(h, up.t())
        return y
    return torch.addmm(y.reshape(-1, y.shape[-1]).to(h.dtype), h, up.t()).view(y.shape).to(y.dtype)


def updated_weight(kind: str, fan_in: int, fan_out: int, weight: torch.Tensor, tensors):
    """``W + diag(λ_b) B diag(λ_d) A`` in the weight's layout: the weight site of a layer
    the model reads without calling it."""
    down, up = scaled_factors(fan_in, fan_out, tensors)
    if kind == CONV1D_GPT2:  # stored in × out
        return torch.addmm(weight, down.t(), up.t())
    return torch.addmm(weight, up, down)


def merged_weight(fan_in: int, fan_out: int, module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    weight = stored(module, "weight")
    exact = torch.promote_types(weight.dtype, torch.float32)
    factors = [tensors[k].to(exact) for k in ("vera_A", "vera_B", "vera_lambda_d", "vera_lambda_b")]
    down, up = scaled_factors(fan_in, fan_out, factors)
    update = to_weight_layout(module, up @ down)
    return {"weight": (weight.to(exact) + update).to(weight.dtype)}


@register_method
@dataclass(frozen=True, kw_only=True)
class VeRA(DeltaSpec):
    """Vector-based random matrix adaptation of Linear and GPT-2 Conv1D layers.

    VeRA (Kopiczko, Blankevoort and Asano, 2024, "VeRA: Vector-based Random Matrix
    Adaptation") adds ``λ_b ⊙ B(λ_d ⊙ A(dropout(x)))`` to each target's output. ``A``
    (r × fan-in) and ``B`` (fan-out × r) are random, frozen and shared by all targets
    (stored once, on the model root: ``vera_A`` and ``vera_B``, sized for the widest
    target; each target uses their top-left corner); only the vectors ``vera_lambda_d``
    (r) and ``vera_lambda_b`` (fan-out) are trained per target, so a delta has far fewer
    trainable numbers than LoRA at the same rank. The math, the initialisation and the
    tensor names and layouts are PEFT's ``VeraConfig``'s, and ``delta.merge()`` folds
    ``diag(λ_b) B diag(λ_d) A`` into the weight.

    A layer the model reads without calling it (its parent's ``forward`` reads
    ``layer.weight`` itself, as transformers' Mamba does with ``dt_proj`` and torch's
    ``nn.MultiheadAttention`` with ``out_proj``; see :mod:`deltahooks.direct_reads`) gets
    the same update through a weight site instead, ``W ← W + diag(λ_b) B diag(λ_d) A``, so
    it acts however the weight is read; ``dh.summary`` marks such parts "via weight".
    ``dropout`` does not apply there (a warning says so).

    Args:
        targets: which layers get an update, in the target syntax of
            :func:`deltahooks.attach` (name suffix such as ``"q_proj"``, glob, ``"re:"``
            regex, ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of
            these). Required. PEFT: ``target_modules``. Each must be an ``nn.Linear`` or
            transformers' GPT-2 ``Conv1D`` (as in PEFT); any other module raises
            :class:`deltahooks.UnsupportedModuleError` at attach.
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``.
            PEFT: ``exclude_modules``.
        r: the rank of the shared projections, a positive integer. Default ``256``
            (PEFT's default: VeRA trains only ``r`` numbers per layer for it, so it uses
            much larger ranks than LoRA). Paper: ``r``; PEFT: ``r``.
        projection_prng_key: the seed the projections are drawn from (Kaiming-uniform,
            ``A`` then ``B``, from a CPU ``torch.Generator``, as PEFT does), an integer
            ``>= 0``. Default ``0``. PEFT: ``projection_prng_key``.
        save_projection: keep the projections in saved files (``True``), or leave them
            out and redraw them from ``projection_prng_key`` at load (``False``: smaller
            files, relying on torch's generator giving the same numbers on the loading
            machine). Default ``True``. PEFT: ``save_projection``.
        dropout: dropout probability on the update's input ``x`` in training mode, in
            ``[0, 1)``. Default ``0.0``. PEFT: ``vera_dropout``.
        d_initial: the value every entry of ``λ_d`` starts at, a finite number. Default
            ``0.1`` (PEFT's default; the paper's Table 6c recommends <= 0.1). PEFT:
            ``d_initial``.
        init: ``"default"``: ``λ_b`` zero and ``λ_d`` = ``d_initial``, so the outputs are
            unchanged at attach (PEFT ``init_weights=True``). ``"random"``: ``λ_b`` one
            and ``λ_d`` standard normal, so the delta changes the outputs from the start
            (PEFT ``init_weights=False``); meant for tests. Default ``"default"``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
        >>> delta = dh.attach(model, dh.VeRA(targets=torch.nn.Linear, r=8))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'vera_A': (8, 6), 'vera_B': (6, 8), '0.vera_lambda_b': (6,), '0.vera_lambda_d': (8,), '1.vera_lambda_b': (2,), '1.vera_lambda_d': (8,)}
        >>> sum(p.numel() for p in delta.parameters())  # only the vectors train
        24
    """

    method = "vera"
    layer_kinds = (LINEAR, CONV1D_GPT2)
    reads_weights = False
    r: int = 256
    projection_prng_key: int = 0
    save_projection: bool = True
    dropout: float = 0.0
    d_initial: float = 0.1
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        validate.positive_int(self, "r", self.r, 256)
        key = self.projection_prng_key
        if not (isinstance(key, int) and not isinstance(key, bool) and 0 <= key < 2**63):
            raise SpecError(
                f"VeRA projection_prng_key={key!r} must be an integer seed >= 0 (below 2**63), "
                "e.g. projection_prng_key=0"
            )
        validate.flag(self, "save_projection", self.save_projection)
        validate.probability(self, "dropout", self.dropout)
        validate.finite(self, "d_initial", self.d_initial)
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        if not self.takes_kind(module):
            raise UnsupportedModuleError(
                f"VeRA cannot adapt {path or '<root>'!r} ({type(module).__name__}); it supports "
                "nn.Linear and transformers Conv1D (as PEFT does). Narrow targets (e.g. "
                "exclude=...) or target the linear layers inside it"
            )

    def make_shared(self, root, targets, *, device: DeviceLike = None) -> dict[str, SharedTensor]:
        """The frozen projections, sized for the widest fan-in and fan-out of the targets."""
        fan_in = max(widths(module)[0] for _, module in targets)
        fan_out = max(widths(module)[1] for _, module in targets)
        opts = tensor_options(targets[0][1], device)
        if device is None:
            a, b = projections(self.r, fan_in, fan_out, self.projection_prng_key)
            a, b = a.to(**opts), b.to(**opts)
        else:  # a plan: shapes only
            a = torch.empty(self.r, fan_in, **opts)
            b = torch.empty(fan_out, self.r, **opts)
        keep = self.save_projection
        return {
            "vera_A": SharedTensor(a, trainable=False, saved=keep),
            "vera_B": SharedTensor(b, trainable=False, saved=keep),
        }

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        fan_in, fan_out = widths(module)
        opts = tensor_options(module, device)
        lambda_b = torch.zeros(fan_out, **opts)
        lambda_d = torch.full((self.r,), float(self.d_initial), **opts)
        if device is None and self.init == "random":
            with torch.no_grad():
                lambda_b.fill_(1.0)
                lambda_d.normal_()
        # An output site, not a weight site: measured on CPU (train step, r=256, 1024
        # tokens), the two tie at width 768 and the site is 1.35x faster at width 1536,
        # and it keeps no full-size W + ΔW alive for backward.
        names = ("vera_A", "vera_B", "vera_lambda_d", "vera_lambda_b")
        direct = needs_weight_site(self, path, module, root)
        if direct:  # the model reads the weight without calling the layer: update it there
            if self.dropout and device is None:
                warn(
                    f"VeRA dropout={self.dropout} does not apply on {path!r}: the model reads "
                    "its weight directly, so the update is folded into the weight, where "
                    "dropout on the layer's input has no place"
                )
            kind = kind_of(module)
            site = WeightSite(partial(updated_weight, kind, fan_in, fan_out), "weight", names)
        else:
            site = OutputSite(
                partial(update, fan_in, fan_out, self.dropout), names, in_place=True, prepend=True
            )
        tensors = {"vera_lambda_b": lambda_b, "vera_lambda_d": lambda_d}
        return Part(
            path,
            tensors,
            [site],
            merge=partial(merged_weight, fan_in, fan_out),
            note=WHY if direct else "",
        )
