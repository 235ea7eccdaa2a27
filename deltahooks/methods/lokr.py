"""LoKr (Edalati et al., 2022, KronA; LyCORIS): ``W + s · (W₁ ⊗ W₂)``, ``s = α/r``.

The weight's rows and columns are each split into two factors (near their square roots by
default); ``W₁`` is a small (out₁ × in₁) matrix and ``W₂`` a larger (out₂ × in₂) one,
low-rank (``A₂B₂``) once ``r`` is small against it. A weight site makes the layer's own
forward read the updated weight, built in one pass over ``W`` without materialising the
Kronecker product; merging writes the same weight into the layer. Tensor names, layouts
and the choice of full or low-rank factors are PEFT's, so PEFT files load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from typing import Literal

import torch
from torch import nn

from .. import validate
from ..errors import SpecError
from ..layers import CONV, CONV1D_GPT2, LINEAR, kind_of, widths
from ..sites import WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from . import _lycoris, _rank_patterns

INITS = ("default", "lycoris", "random")
SUPPORTED = "nn.Linear, transformers Conv1D and nn.Conv2d"


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """Split ``dimension`` into two factors, as PEFT's LoKr does.

    A positive ``factor`` that divides it gives ``(factor, dimension // factor)``.
    Otherwise divisors are tried in increasing order (up to ``factor``, or all for -1)
    until they pass the square root; the result is the last pair, smaller first.

    Example:
        >>> factorization(128), factorization(127), factorization(128, 4), factorization(30, 4)
        ((8, 16), (1, 127), (4, 32), (3, 10))
    """
    if factor > 0 and dimension % factor == 0:
        return factor, dimension // factor
    limit = dimension if factor == -1 else factor
    m, n = 1, dimension
    while m < n:
        divisor = next(d for d in range(m + 1, dimension + 1) if dimension % d == 0)
        if divisor > limit:
            break
        m, n = divisor, dimension // divisor
    return (m, n) if m <= n else (n, m)


@torch.no_grad()
def _initialise(tensors: dict[str, torch.Tensor], init: str) -> None:
    # one zero factor makes the update start at exactly zero: W₁ (A₁) by default, W₂
    # (B₂) the LyCORIS way
    zero = {"default": ("lokr_w1", "lokr_w1_a"), "lycoris": ("lokr_w2", "lokr_w2_b")}
    for name, tensor in tensors.items():
        if name in zero.get(init, ()):
            nn.init.zeros_(tensor)
        else:
            nn.init.kaiming_uniform_(tensor, a=math.sqrt(5))


def kronecker_weight(
    transposed: bool, full1: bool, full2: bool, scale: float, weight: torch.Tensor, tensors
) -> torch.Tensor:
    """``W + s · (W₁ ⊗ W₂)`` in the weight's own layout, from the factors as stored.

    ``W`` is viewed as ``(out₁, out₂, in₁, rest)`` so that one broadcast multiply-add
    writes the result: the Kronecker product itself is never materialised. ``transposed``:
    the weight is stored fan-in × fan-out (GPT-2 ``Conv1D``), viewed ``(in₁, rest, out₁,
    out₂)``.
    """
    w1, rest = (tensors[0], tensors[1:]) if full1 else (tensors[0] @ tensors[1], tensors[2:])
    w2 = rest[0] if full2 else rest[0] @ rest[1]
    (out1, in1), out2 = w1.shape, w2.shape[0]
    w2 = w2.reshape(out2, -1)  # a kernel's (in₂, kh, kw) read as one dimension
    if transposed:
        blocks = weight.view(in1, -1, out1, out2)
        w1, w2 = w1.t()[:, None, :, None], w2.t()[None, :, None, :]
    else:
        blocks = weight.view(out1, out2, in1, -1)
        w1, w2 = w1[:, None, :, None], w2[None, :, None, :]
    return torch.addcmul(blocks, w1, w2, value=scale).view_as(weight)


@register_method
@dataclass(frozen=True, kw_only=True)
class LoKr(DeltaSpec):
    """Kronecker product update of Linear, GPT-2 Conv1D and Conv2d layers.

    LoKr (Edalati et al., 2022, "KronA: Parameter Efficient Tuning with Kronecker Adapter";
    LyCORIS; PEFT ``LoKrConfig``) changes each target's weight to ``W + s · (W₁ ⊗ W₂)``
    with ``W`` frozen and ``s = alpha / r``. The output width is factored as
    ``out₁ · out₂`` and the input width as ``in₁ · in₂`` (:func:`factorization`), ``W₁`` is
    out₁ × in₁ and ``W₂`` out₂ × in₂ (× the kernel, for a convolution). ``W₂`` is
    trained as a low-rank product ``A₂B₂`` when ``r < max(out₂, in₂) / 2``, else as a
    full matrix; ``W₁`` is full unless ``decompose_both``. These choices, the defaults and
    the initialisation are PEFT's, and so are the tensor names (``lokr_w1`` or
    ``lokr_w1_a``/``lokr_w1_b``, ``lokr_w2`` or ``lokr_w2_a``/``lokr_w2_b``). The layer's
    own forward reads the updated weight (a weight site; the base ``state_dict`` keys stay
    as they are), and ``delta.merge()`` writes it into the layer. Every argument is
    keyword-only and checked when the spec is created: a bad value raises
    :class:`deltahooks.SpecError` at once.

    Args:
        targets: which layers get an update, in the target syntax of
            :func:`deltahooks.attach` (name suffix such as ``"q_proj"``, glob, ``"re:"``
            regex, ``"all-linear"``, module class, callable, ``dh.Paths``, or a list of
            these). Required. PEFT: ``target_modules``. Each must be an ``nn.Linear``,
            transformers' GPT-2 ``Conv1D`` (which PEFT's LoKr refuses) or ``nn.Conv2d``;
            any other module raises :class:`deltahooks.UnsupportedModuleError` at attach.
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``.
            PEFT: ``exclude_modules``.
        r: the rank of the low-rank factors, a positive integer; it also decides which
            factors are low-rank (above). Default ``8``. PEFT: ``r``.
        alpha: the scale numerator: the update is multiplied by ``alpha / r``. A finite
            number ``>= 0``. Default ``8.0`` (PEFT's ``alpha=8``).
        factor: how the widths are split. ``-1``: into the two divisors nearest the
            square root (``out₁ <= out₂``). A positive integer that divides a width:
            ``factor × width / factor``; one that does not: the largest divisor up to
            ``factor`` paired with its cofactor, smaller first. Default ``-1``. PEFT:
            ``decompose_factor``.
        decompose_both: also train ``W₁`` as a low-rank product ``A₁B₁`` when
            ``r < max(out₁, in₁) / 2``. Default ``False``. PEFT: ``decompose_both``.
        init: how the factors start. ``"default"`` (PEFT ``init_weights=True``): ``W₁``
            (or ``A₁``) zero, the others Kaiming-uniform, so the outputs are unchanged
            at attach. ``"lycoris"`` (PEFT ``init_weights="lycoris"``): ``W₂`` (or
            ``B₂``) zero instead, also unchanged at attach. ``"random"`` (PEFT
            ``init_weights=False``): all Kaiming-uniform, so the delta changes the
            outputs from the start; meant for tests. Default ``"default"``.
        rank_pattern: per-target rank overrides, ``{pattern: rank}``, e.g.
            ``{"down_proj": 4}``; keys use the target syntax and the first key that
            matches a target wins. Default ``{}``. PEFT: ``rank_pattern``.
        alpha_pattern: per-target ``alpha`` overrides, ``{pattern: alpha}``, matched like
            ``rank_pattern``. Default ``{}``. PEFT: ``alpha_pattern``.

    PEFT's ``rank_dropout``, ``module_dropout``, ``rank_dropout_scale`` and
    ``use_effective_conv2d`` are not offered.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(48, 32))  # in 6 · 8, out 4 · 8
        >>> delta = dh.attach(model, dh.LoKr(targets=["0"], r=2))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'0.lokr_w1': (4, 6), '0.lokr_w2_a': (8, 2), '0.lokr_w2_b': (2, 8)}
    """

    method = "lokr"
    r: int = 8
    alpha: float = 8.0
    factor: int = -1
    decompose_both: bool = False
    init: Literal["default", "lycoris", "random"] = "default"
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def validate(self) -> None:
        _rank_patterns.validate_rank_and_alpha(self)
        if not (isinstance(self.factor, int) and not isinstance(self.factor, bool)) or not (
            self.factor == -1 or self.factor > 0
        ):
            raise SpecError(
                f"LoKr factor={self.factor!r} must be -1 (split near the square root) or a "
                "positive integer, e.g. factor=4"
            )
        validate.flag(self, "decompose_both", self.decompose_both)
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        kind = kind_of(module)
        if kind not in (LINEAR, CONV1D_GPT2, CONV) or (kind == CONV and module.weight.dim() != 4):
            _lycoris.refuse(self, path, module, SUPPORTED)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        rank, scale = _rank_patterns.rank_and_scale(self, path, module, root)
        kind = kind_of(module)
        if kind == CONV:
            fan_in, fan_out = module.in_channels // module.groups, module.out_channels
            kernel = tuple(module.kernel_size)
        else:
            (fan_in, fan_out), kernel = widths(module), ()
        out1, out2 = factorization(fan_out, self.factor)
        in1, in2 = factorization(fan_in, self.factor)
        full1 = not (self.decompose_both and rank < max(out1, in1) / 2)
        full2 = rank >= max(out2, in2) / 2
        shapes = {}
        if full1:
            shapes["lokr_w1"] = (out1, in1)
        else:
            shapes.update(lokr_w1_a=(out1, rank), lokr_w1_b=(rank, in1))
        if full2:
            shapes["lokr_w2"] = (out2, in2, *kernel)
        else:
            shapes.update(lokr_w2_a=(out2, rank), lokr_w2_b=(rank, in2 * math.prod(kernel)))
        options = tensor_options(module, device)
        tensors = {name: torch.empty(shape, **options) for name, shape in shapes.items()}
        if self.real_build(device):
            _initialise(tensors, self.init)
        names = tuple(tensors)
        fn = partial(kronecker_weight, kind == CONV1D_GPT2, full1, full2, scale)
        # A weight site, not an output hook like PEFT's: W + s·(W₁ ⊗ W₂) is one pass over W
        # (the Kronecker product is never built), where F.linear(x, ΔW) is a second matmul
        # over every token (1376×512 layer, one CPU thread, 512 tokens: forward 0.50×,
        # train step 0.73× the hook's time; about even at 1 token).
        return Part(
            path,
            tensors,
            [WeightSite(fn, "weight", names)],
            merge=partial(_lycoris.merged_weight, fn, names),
        )
