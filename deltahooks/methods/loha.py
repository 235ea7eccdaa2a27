"""LoHa (Hyeon-Woo et al., 2022, FedPara; LyCORIS): ``W + s · (A₁B₁) ⊙ (A₂B₂)``, ``s = α/r``.

The Hadamard product of two rank-``r`` products reaches rank ``r²`` with the parameters
of two rank-``r`` LoRAs. A weight site makes the layer's own forward read the updated
weight; merging writes the same weight into the layer. Tensor names and layouts are
PEFT's (``hada_w1_a``: fan-out × r, ``hada_w1_b``: r × fan-in, ...), so PEFT files load
without transposes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import nn

from .. import validate
from ..layers import CONV, CONV1D_GPT2, LINEAR, kind_of, widths
from ..sites import WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from . import _lycoris, _rank_patterns

INITS = ("default", "random")
NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
SUPPORTED = "nn.Linear, transformers Conv1D, nn.Conv1d and nn.Conv2d"


@torch.no_grad()
def _initialise(tensors: dict[str, torch.Tensor], init: str) -> None:
    for name, tensor in tensors.items():
        if name == "hada_w2_b" and init == "default":
            nn.init.zeros_(tensor)  # one zero factor: the update starts at exactly zero
        else:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def hadamard_weight(transposed: bool, scale: float, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``W + s · (A₁B₁) ⊙ (A₂B₂)`` in the weight's own layout.

    ``transposed``: the weight is stored fan-in × fan-out (GPT-2 ``Conv1D``), so the
    update is built transposed, ``(B₁ᵀA₁ᵀ) ⊙ (B₂ᵀA₂ᵀ)``, with no copy of ``W``.
    """
    a1, b1, a2, b2 = tensors
    if transposed:
        a1, b1, a2, b2 = b1.t(), a1.t(), b2.t(), a2.t()
    matrix = weight.flatten(1)  # a convolution's kernel as fan-out × (fan-in · kernel)
    return HadamardUpdate.apply(matrix, a1, b1, a2, b2, scale).view_as(weight)


class HadamardUpdate(torch.autograd.Function):
    """``W + s · (A₁B₁) ⊙ (A₂B₂)`` that keeps only the small factors for the backward.

    Plain autograd would keep both full-size products alive per layer until the
    backward; here they are recomputed there (one matmul each), as PEFT does. Written
    with ``setup_context`` and a generated vmap rule, so ``torch.func`` transforms work.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(weight, a1, b1, a2, b2, scale: float):
        return torch.addcmul(weight, a1 @ b1, a2 @ b2, value=scale)

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, a1, b1, a2, b2, scale = inputs
        ctx.save_for_backward(a1, b1, a2, b2)
        ctx.scale = scale

    @staticmethod
    def backward(ctx, grad):
        a1, b1, a2, b2 = ctx.saved_tensors
        needs = ctx.needs_input_grad
        grads = [grad if needs[0] else None, None, None, None, None, None]
        for i, (a, b, other_a, other_b) in enumerate(((a1, b1, a2, b2), (a2, b2, a1, b1))):
            if needs[1 + 2 * i] or needs[2 + 2 * i]:
                # d/d(AB) of s · (AB) ⊙ P is s · grad ⊙ P; the scale goes on the small results
                through = (other_a @ other_b).mul_(grad)
                if needs[1 + 2 * i]:
                    grads[1 + 2 * i] = (through @ b.mT).mul_(ctx.scale)
                if needs[2 + 2 * i]:
                    grads[2 + 2 * i] = (a.mT @ through).mul_(ctx.scale)
        return tuple(grads)


@register_method
@dataclass(frozen=True, kw_only=True)
class LoHa(DeltaSpec):
    """Low-rank Hadamard product update of Linear, GPT-2 Conv1D and Conv1d/Conv2d layers.

    LoHa (Hyeon-Woo et al., 2022, "FedPara: Low-Rank Hadamard Product for
    Communication-Efficient Federated Learning"; LyCORIS; PEFT ``LoHaConfig``) changes each
    target's weight to ``W + s · (A₁B₁) ⊙ (A₂B₂)`` with ``A₁, A₂`` (fan-out × r) and
    ``B₁, B₂`` (r × fan-in) trained and ``W`` frozen, ``s = alpha / r``: the element-wise
    product of two rank-``r`` matrices has rank up to ``r²``. A convolution's kernel is
    read as a fan-out × (fan-in · kernel) matrix (PEFT's default,
    ``use_effective_conv2d=False``). The layer's own forward reads the updated weight (a
    weight site; the base ``state_dict`` keys stay as they are), and ``delta.merge()``
    writes it into the layer. Defaults and initialisation are PEFT's. Every argument is
    keyword-only and checked when the spec is created: a bad value raises
    :class:`deltahooks.SpecError` at once.

    Args:
        targets: which layers get an update, in the target syntax of
            :func:`deltahooks.attach` (name suffix such as ``"q_proj"``, glob, ``"re:"``
            regex, ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of
            these). Required. PEFT: ``target_modules``. Each must be an ``nn.Linear``,
            transformers' GPT-2 ``Conv1D`` (which PEFT's LoHa refuses), ``nn.Conv1d`` or
            ``nn.Conv2d``; any other module raises
            :class:`deltahooks.UnsupportedModuleError` at attach.
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``.
            PEFT: ``exclude_modules``.
        r: the rank of each of the two products, a positive integer. Default ``8``.
            PEFT: ``r``. The delta has ``2 · r · (fan_in + fan_out)`` parameters per layer.
        alpha: the scale numerator: the update is multiplied by ``alpha / r``. A finite
            number ``>= 0``. Default ``8.0`` (PEFT's ``alpha=8``).
        init: how the factors start. ``"default"`` (PEFT ``init_weights=True``):
            ``A₁, B₁, A₂`` Kaiming-uniform and ``B₂`` zero, so the outputs are unchanged at
            attach. ``"random"`` (PEFT ``init_weights=False``): all four Kaiming-uniform,
            so the delta changes the outputs from the start; meant for tests.
            Default ``"default"``.
        rank_pattern: per-target rank overrides, ``{pattern: rank}``, e.g.
            ``{"down_proj": 4}``; keys use the target syntax and the first key that
            matches a target wins. Default ``{}``. PEFT: ``rank_pattern``.
        alpha_pattern: per-target ``alpha`` overrides, ``{pattern: alpha}``, matched like
            ``rank_pattern``. Default ``{}``. PEFT: ``alpha_pattern``.

    PEFT's ``rank_dropout``, ``module_dropout`` and ``use_effective_conv2d`` are not
    offered.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Conv2d(6, 2, 3))
        >>> delta = dh.attach(model, dh.LoHa(targets=["0", "1"], r=2))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items() if key[0] == "1"}
        {'1.hada_w1_a': (2, 2), '1.hada_w1_b': (2, 54), '1.hada_w2_a': (2, 2), '1.hada_w2_b': (2, 54)}
        >>> [key for key in model.state_dict() if "dh__" not in key]  # base keys as they were
        ['0.weight', '0.bias', '1.weight', '1.bias']
    """

    method = "loha"
    r: int = 8
    alpha: float = 8.0
    init: Literal["default", "random"] = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        _rank_patterns.validate_rank_and_alpha(self)
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        kind = kind_of(module)
        if kind not in (LINEAR, CONV1D_GPT2, CONV) or (kind == CONV and module.weight.dim() > 4):
            _lycoris.refuse(self, path, module, SUPPORTED)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        rank, scale = _rank_patterns.rank_and_scale(self, path, module, root)
        fan_in, fan_out = widths(module)
        options = tensor_options(module, device)
        shapes = ((fan_out, rank), (rank, fan_in), (fan_out, rank), (rank, fan_in))
        tensors = {name: torch.empty(shape, **options) for name, shape in zip(NAMES, shapes)}
        if self.real_build(device):
            _initialise(tensors, self.init)
        fn = partial(hadamard_weight, kind_of(module) == CONV1D_GPT2, scale)
        # A weight site, not an output hook like PEFT's: both build the full-size update,
        # but adding it to W is one pass over the weight where F.linear(x, ΔW) is a second
        # matmul over every token (1376×512 layer, one CPU thread, 512 tokens: forward
        # 0.53×, train step 0.70× the hook's time; about even at 1 token).
        return Part(
            path,
            tensors,
            [WeightSite(fn, "weight", NAMES)],
            merge=partial(_lycoris.merged_weight, fn, NAMES),
        )
