"""(IA)³ (Liu et al., 2022): learned vectors that rescale activations, ``y = l ⊙ f(x)``.

An output site scales a target's output channels; for the targets named in
``feedforward``, an input site scales its input features instead, ``y = f(l ⊙ x)``, as
in PEFT's ``IA3Config``. The vectors start at one (outputs unchanged at attach).
Merging multiplies the weight's output rows (and the bias) or input columns.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import nn

from .. import validate
from ..direct_reads import WHY, needs_weight_site
from ..errors import SpecError, TargetError, UnsupportedModuleError
from ..layers import (
    CONV,
    CONV1D_GPT2,
    EMBEDDING,
    LINEAR,
    along_channels,
    channel_dim,
    kind_of,
    widths,
)
from ..merging import stored
from ..sites import InputSite, OutputSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ..targets import first_match

NAMES = ("ia3_l",)
INITS = ("default", "random")


def scale_output(dim: int, module: nn.Module, x, y, tensors, writable):
    """``l ⊙ y`` along the output channels (the bias is scaled too)."""
    (vector,) = tensors
    return (y * along_channels(vector, dim, y.dim())).to(y.dtype)


def scale_input(dim: int, module: nn.Module, x, tensors):
    """``l ⊙ x`` along the input features."""
    (vector,) = tensors
    return (x * along_channels(vector, dim, x.dim())).to(x.dtype)


def weight_factor(
    kind: str, feedforward: bool, groups: int, weight: torch.Tensor, vector: torch.Tensor
):
    """The vector shaped to multiply ``weight``'s input columns or output rows."""
    if kind != CONV:  # an out × in factor, put in the layer's own layout
        matrix = vector[None, :] if feedforward else vector[:, None]
        return matrix.t() if kind in (CONV1D_GPT2, EMBEDDING) else matrix
    ones = [1] * (weight.dim() - 2)
    if not feedforward:
        return vector.view(-1, 1, *ones)
    # weight (out, in / groups, *kernel): output channel o of group g reads the inputs
    # g · in/groups ... (g + 1) · in/groups - 1
    per_group = vector.view(groups, -1)
    factor = per_group.repeat_interleave(weight.shape[0] // groups, dim=0)
    return factor.view(*factor.shape, *ones)


def scaled_weight(kind: str, feedforward: bool, groups: int, weight: torch.Tensor, tensors):
    """The weight with its output rows (or input columns) scaled: the weight site of a
    layer the model reads without calling it."""
    (vector,) = tensors
    return weight * weight_factor(kind, feedforward, groups, weight, vector)


def scaled_bias(bias: torch.Tensor, tensors) -> torch.Tensor:
    """``l ⊙ b``: the bias of a scaled output."""
    (vector,) = tensors
    return bias * vector


def merged(kind: str, feedforward: bool, module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    weight = stored(module, "weight")
    exact = torch.promote_types(weight.dtype, torch.float32)
    vector = tensors["ia3_l"].to(exact)
    groups = module.groups if kind == CONV else 1
    values = {"weight": scaled_weight(kind, feedforward, groups, weight.to(exact), (vector,))}
    values["weight"] = values["weight"].to(weight.dtype)
    if not feedforward and isinstance(getattr(module, "bias", None), torch.Tensor):
        bias = stored(module, "bias")
        values["bias"] = (bias.to(exact) * vector).to(bias.dtype)
    return values


def _entries(feedforward) -> list | None:
    if isinstance(feedforward, str):
        return [feedforward]
    if isinstance(feedforward, (list, tuple)):
        return list(feedforward)
    return None


@register_method
@dataclass(frozen=True, kw_only=True)
class IA3(DeltaSpec):
    """Scale the outputs of ``targets``, or the inputs of those in ``feedforward``.

    (IA)³ (Liu et al., 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and
    Cheaper than In-Context Learning"; PEFT ``IA3Config``) learns one vector per target
    that multiplies activations element-wise: the output channels of a target
    (``y = l ⊙ f(x)``; the paper's keys and values, e.g. ``k_proj``, ``v_proj``), or, for a
    target also named in ``feedforward``, its input features (``y = f(l ⊙ x)``; the
    paper's scaling of the feed-forward's inner activation, e.g. ``down_proj``). The
    vectors start at one, so the outputs are unchanged at attach. ``delta.merge()``
    multiplies the weight's rows (and the bias) by an output vector, or its columns by
    an input vector (the bias is left as it is), as PEFT does. A vector is stored 1-D
    (``ia3_l``: out- or in-features long); PEFT holds the same values as ``(out, 1)``,
    ``(1, in)`` or ``(1, C, 1, 1)``. Every argument is keyword-only and checked when the
    spec is created: a bad value raises :class:`deltahooks.SpecError` at once.

    A layer the model reads without calling it (its parent's ``forward`` reads
    ``layer.weight`` itself, as transformers' Mamba does with ``dt_proj`` and torch's
    ``nn.MultiheadAttention`` with ``out_proj``; see :mod:`deltahooks.direct_reads`) gets
    the same update through a weight site instead, ``W`` scaled by rows (and ``b ← l ⊙ b``) or
    by columns, so it acts however the weight is read; ``dh.summary`` marks such parts
    "via weight".

    Args:
        targets: which layers get a vector, in the target syntax of
            :func:`deltahooks.attach` (name suffix such as ``"k_proj"``, glob, ``"re:"``
            regex, ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of
            these). Required (PEFT's per-architecture default lists are not built in):
            e.g. ``["k_proj", "v_proj", "down_proj"]`` on Llama, ``["c_attn", "mlp.c_proj"]``
            on GPT-2. PEFT: ``target_modules``. Each must be an ``nn.Linear``,
            transformers' GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d`` or ``nn.Embedding``
            (output only); any other module raises
            :class:`deltahooks.UnsupportedModuleError` at attach. (PEFT takes Linear,
            Conv1D and Conv2d/3d.)
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``.
            PEFT: ``exclude_modules``.
        feedforward: the targets whose **input** is scaled instead of their output: a
            string or a list of strings in the target syntax (name suffix on a ``.``
            boundary, glob, ``"re:"`` regex, ``"all-linear"``), e.g. ``["down_proj"]``.
            Every entry must select at least one of the targets (PEFT:
            ``feedforward_modules`` must be a subset of ``target_modules``), else
            :class:`deltahooks.TargetError` at attach. Default ``[]`` (every target
            scales its output). PEFT: ``feedforward_modules``; note PEFT matches a list
            entry as a plain string suffix (``"proj"`` matches ``down_proj``) and a single
            string as a regex, where ours means ``"re:..."``.
        init: how the vectors start. ``"default"``: ones, so the outputs are unchanged
            at attach (PEFT ``init_ia3_weights=True``). ``"random"``: normal around one
            (standard deviation 0.25), so the outputs change from the start; meant for
            tests. Default ``"default"``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> delta = dh.attach(model, dh.IA3(targets=["0", "2"], feedforward=["2"]))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'0.ia3_l': (8,), '2.ia3_l': (8,)}
    """

    method = "ia3"
    layer_kinds = (LINEAR, CONV1D_GPT2, CONV, EMBEDDING)
    reads_weights = False
    feedforward: str | list[str] = field(default_factory=list)
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        entries = _entries(self.feedforward)
        if entries is None or not all(isinstance(e, str) and e for e in entries):
            raise SpecError(
                f"IA3 feedforward={self.feedforward!r} must be a target string or a list of "
                "them (name suffix, glob or 're:' regex), e.g. feedforward=['down_proj']"
            )
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        if not self.takes_kind(module):
            raise UnsupportedModuleError(
                f"IA3 cannot scale {path or '<root>'!r} ({type(module).__name__}); it supports "
                "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding. Narrow "
                "targets (e.g. exclude=...) or target the linear layers inside it"
            )

    def make_shared(self, root, targets, *, device: DeviceLike = None) -> dict:
        """No shared tensors: checks, before anything is built, that ``feedforward`` fits."""
        for entry in _entries(self.feedforward):
            chosen = [(p, m) for p, m in targets if first_match(p, m, {entry: True}, root)]
            if not chosen:
                raise TargetError(
                    f"IA3 feedforward entry {entry!r} selects none of the targets "
                    f"{[p for p, _ in targets][:8]}: a feedforward layer must also be a target "
                    "(PEFT: feedforward_modules is a subset of target_modules); add it to "
                    "targets or fix the pattern"
                )
            for path, module in chosen:
                if kind_of(module) == EMBEDDING:
                    raise UnsupportedModuleError(
                        f"IA3 cannot scale the input of embedding {path!r}: its input is token "
                        "ids; leave it out of feedforward (its output can be scaled)"
                    )
        return {}

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        entries = {entry: True for entry in _entries(self.feedforward)}
        feedforward = bool(first_match(path, module, entries, root))
        kind = kind_of(module)
        if feedforward:
            width = module.in_channels if kind == CONV else widths(module)[0]
        else:
            width = widths(module)[1]
        vector = torch.ones(width, **tensor_options(module, device))
        if device is None and self.init == "random":
            with torch.no_grad():
                vector.normal_(1.0, 0.25)
        dim = channel_dim(module)  # a conv's input holds its channels where its output does
        direct = needs_weight_site(self, path, module, root)
        if direct:  # the model reads the weight without calling the layer: scale it there
            groups = module.groups if kind == CONV else 1
            sites = [WeightSite(partial(scaled_weight, kind, feedforward, groups), "weight", NAMES)]
            if not feedforward and isinstance(getattr(module, "bias", None), torch.Tensor):
                sites.append(WeightSite(scaled_bias, "bias", NAMES))
        elif feedforward:
            sites = [InputSite(partial(scale_input, dim), NAMES)]
        else:
            sites = [OutputSite(partial(scale_output, dim), NAMES)]
        # A scale of the layer: it merges after additive updates of the same delta
        # (merge_order 2) and only while no other unmerged delta acts on this layer.
        return Part(
            path,
            {"ia3_l": vector},
            sites,
            merge=partial(merged, kind, feedforward),
            merge_order=2,
            exclusive_merge=True,
            note=WHY if direct else "",
        )
