"""BOFT (Liu et al., 2024): OFT whose rotation is a product of butterfly-ordered
block-diagonal orthogonal factors, plus a learned scale of the output channels.

``W ↦ diag(s) W Mᵀ``, ``M = B'ₙ₋₁ ⋯ B'₀`` with ``B'ₗ = Pₗ Bₗ Pₗᵀ``: ``Bₗ`` block-diagonal
with exact Cayley blocks, ``Pₗ`` the butterfly reordering of level ``l``; as PEFT's
``BOFTConfig`` computes it.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import nn

from .. import validate
from ..direct_reads import WHY, needs_weight_site
from ..errors import SpecError, UnsupportedModuleError
from ..layers import CONV, CONV1D_GPT2, LINEAR, kind_of, widths
from ..merging import stored
from ..sites import InputSite, OutputSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ._orthogonal import PEFT_BOFT_BLOCK_SIZE, cayley, nearest_divisor, rotate
from .oft import rotated_weight

INITS = ("default", "random")


def rotations(blocks: torch.Tensor) -> torch.Tensor:
    """Exact Cayley blocks of ``(A - Aᵀ)/2`` in float32 or wider, ``blocks``' shape."""
    exact = torch.promote_types(blocks.dtype, torch.float32)
    blocks = blocks.to(exact)
    return cayley(0.5 * (blocks - blocks.transpose(-2, -1)), None)


def rotate_input(module: nn.Module, x, tensors):
    """``x M`` on the input features."""
    (blocks,) = tensors
    return rotate(x, rotations(blocks).to(x.dtype))


def scale_output(module: nn.Module, x, y, tensors, writable):
    """``s ⊙ (y - b) + b``: the scale acts on ``W Mᵀ x``, not on the bias."""
    (scale,) = tensors
    bias = getattr(module, "bias", None)
    if bias is None:
        return y * scale.view(-1).to(y.dtype)
    return (y - bias) * scale.view(-1).to(y.dtype) + bias


def transform_weight(weight: torch.Tensor, tensors) -> torch.Tensor:
    """A convolution's ``diag(s) W Mᵀ`` with each filter flattened."""
    blocks, scale = tensors
    rotated = rotate(weight.flatten(1), rotations(blocks).to(weight.dtype), transpose=True)
    return (rotated * scale.to(weight.dtype)).view_as(weight)


def boft_weight(kind: str, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``diag(s) W Mᵀ`` in the weight's own layout (the bias untouched)."""
    blocks, scale = tensors
    value = rotated_weight(kind, weight, rotations(blocks).to(weight.dtype))
    scale = scale.to(weight.dtype).view(-1)
    if kind == CONV1D_GPT2:  # (in, out)
        return value * scale
    return value * scale.view(-1, *[1] * (weight.dim() - 1))


def merged(kind: str, module: nn.Module, tensors) -> dict:
    weight = stored(module, "weight")
    exact = torch.promote_types(weight.dtype, torch.float32)
    value = boft_weight(kind, weight.to(exact), (tensors["boft_R"], tensors["boft_s"]))
    return {"weight": value.to(weight.dtype)}


@register_method
@dataclass(frozen=True, kw_only=True)
class BOFT(DeltaSpec):
    """Butterfly orthogonal finetuning: rotate each target's input space, scale its outputs.

    BOFT (Liu et al., 2024, "Parameter-Efficient Orthogonal Finetuning via Butterfly
    Factorization"; PEFT ``BOFTConfig``) replaces a layer's weight ``W`` (``out × in``) by
    ``diag(s) W Mᵀ``. The orthogonal ``M`` is a product of ``butterfly_factor``
    block-diagonal factors, each read through a butterfly reordering of the inputs, so
    that with several factors every input can mix with every other while each factor
    stays sparse. Each ``block_size × block_size`` block is the exact Cayley transform
    ``(I - Q)(I + Q)⁻¹`` of ``Q = (A - Aᵀ)/2``, ``A`` learned (``boft_R``:
    ``(butterfly_factor, in / block_size, block_size, block_size)``); ``s`` (``boft_s``:
    ``(out, 1)``) scales the output channels. Both are PEFT's layouts and start at
    ``A = 0``, ``s = 1``: the outputs are unchanged at attach. Where it acts: a dense layer
    (``nn.Linear``, GPT-2 ``Conv1D``) rotates its input block by block and scales its
    output less the bias (PEFT instead builds the dense ``in × in`` matrix ``M``); a
    convolution (``nn.Conv1d/2d/3d``) gets its weight rotated per flattened filter
    (``in/groups × kernel``) and scaled through a parametrization. ``delta.merge()``
    folds both into the weight. Every argument is keyword-only and checked when the spec
    is created.

    Args:
        targets: which layers to transform, in the target syntax of
            :func:`deltahooks.attach` (name suffix, glob, ``"re:"`` regex,
            ``"all-linear"``, module class, callable, ``dh.Paths`` or a list of these),
            e.g. ``["q_proj", "v_proj"]``. Each must be ``nn.Linear``, GPT-2 ``Conv1D`` or
            ``nn.Conv1d/2d/3d``; any other module raises
            :class:`deltahooks.UnsupportedModuleError` at attach. PEFT:
            ``target_modules`` (PEFT takes Linear and Conv2d).
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``. PEFT:
            ``exclude_modules``.
        block_size: the size of each orthogonal block. It must divide every target's
            rotated width, and with ``butterfly_factor > 1`` be even with
            ``block_size · 2^(butterfly_factor-1)`` dividing the width (else
            :class:`deltahooks.SpecError` at attach). Default ``None``: per target, the
            allowed divisor of its width nearest to 4 (PEFT's default
            ``boft_block_size=4``; ties to the smaller one), so any width works with one
            factor (a prime width of 7 or more gets blocks of 1: only the scale trains); a width
            with no allowed divisor for more factors is refused at attach. PEFT:
            ``boft_block_size`` (which PEFT requires to divide; ``boft_block_num`` is
            ``width / block_size``).
        butterfly_factor: how many butterfly factors ``M`` has; 1 is OFT with exact
            Cayley blocks and a scale. Default 1, as PEFT's ``boft_n_butterfly_factor``
            (which PEFT forces to 1 where its CUDA extension does not build).
        init: ``"default"``: ``A = 0``, ``s = 1``, outputs unchanged at attach (PEFT
            ``init_weights=True``). ``"random"``: ``A`` normal with standard deviation 0.1,
            ``s`` normal around 1 with standard deviation 0.1 (PEFT ``init_weights=False``),
            for tests. Default ``"default"``.

    PEFT's ``boft_dropout`` (identity blocks at random while training) is not implemented;
    :func:`deltahooks.load_peft` refuses adapters trained with it.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> delta = dh.attach(model, dh.BOFT(targets=["0", "2"], butterfly_factor=2))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'0.boft_R': (2, 4, 4, 4), '0.boft_s': (8, 1), '2.boft_R': (2, 2, 4, 4), '2.boft_s': (2, 1)}
    """

    method = "boft"
    layer_kinds = (LINEAR, CONV1D_GPT2, CONV)
    block_size: int | None = None
    butterfly_factor: int = 1
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        validate.optional_positive_int(self, "block_size", self.block_size, example=4)
        validate.positive_int(self, "butterfly_factor", self.butterfly_factor, example=2)
        validate.one_of(self, "init", self.init, INITS)
        if self.butterfly_factor > 1 and self.block_size is not None and self.block_size % 2:
            raise SpecError(
                f"BOFT block_size={self.block_size} must be even with butterfly_factor="
                f"{self.butterfly_factor} (a butterfly swaps half blocks); e.g. block_size=4"
            )

    def allowed(self, width: int, size: int) -> bool:
        """``size`` fits a width (see ``block_size``)."""
        if self.butterfly_factor == 1:
            return width % size == 0
        return size % 2 == 0 and width % (size * 2 ** (self.butterfly_factor - 1)) == 0

    def size_for(self, module: nn.Module) -> int | None:
        width = widths(module)[0]
        if self.block_size is not None:
            return self.block_size if self.allowed(width, self.block_size) else None
        return nearest_divisor(width, PEFT_BOFT_BLOCK_SIZE, allowed=partial(self.allowed, width))

    def check_module(self, path: str, module: nn.Module) -> None:
        if not self.takes_kind(module):
            raise UnsupportedModuleError(
                f"BOFT cannot transform {path or '<root>'!r} ({type(module).__name__}); it "
                "supports nn.Linear, transformers Conv1D and nn.Conv1d/2d/3d. Narrow targets "
                "(e.g. exclude=...) or target the linear layers inside it"
            )
        if self.size_for(module) is None:
            width = widths(module)[0]
            factor = self.butterfly_factor
            need = (
                f"block_size={self.block_size} must divide it"
                if factor == 1
                else f"it needs an even block_size b with b·2^{factor - 1} dividing it"
            )
            raise SpecError(
                f"BOFT cannot fit {path or '<root>'!r}: its rotated width is {width} and {need}; "
                "choose another block_size (None picks one per layer) or a smaller "
                "butterfly_factor"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        kind, (width, out) = kind_of(module), widths(module)
        size = self.size_for(module)
        options = tensor_options(module, device)
        blocks = torch.zeros(self.butterfly_factor, width // size, size, size, **options)
        scale = torch.ones(out, 1, **options)
        if device is None and self.init == "random":
            with torch.no_grad():
                blocks.normal_(0.0, 0.1)
                scale.normal_(1.0, 0.1)
        names = ("boft_R", "boft_s")
        direct = kind != CONV and needs_weight_site(self, path, module, root)
        if kind == CONV:  # a filter's inputs overlap between positions: transform the weight
            sites, order = [WeightSite(transform_weight, "weight", names)], 0
        elif direct:  # the model reads the weight without calling the layer: transform it
            sites, order = [WeightSite(partial(boft_weight, kind), "weight", names)], 0
        else:  # rotate the input and scale the output: no dense M, no weight gradient
            sites = [InputSite(rotate_input, ("boft_R",)), OutputSite(scale_output, ("boft_s",))]
            order = 2
        return Part(
            path,
            {"boft_R": blocks, "boft_s": scale},
            sites,
            merge=partial(merged, kind),
            merge_order=order,  # as OFT's (see deltahooks.methods.oft)
            exclusive_merge=True,
            note=WHY if direct else "",
        )
