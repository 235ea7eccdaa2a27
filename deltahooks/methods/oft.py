"""OFT (Qiu et al., 2023): rotate a layer's input space by a block-diagonal orthogonal matrix.

``W ↦ W Rᵀ`` with ``R = blockdiag(R₁ … Rᵣ)``, each block the Cayley transform of a
learned skew-symmetric matrix (zero at attach: ``R = I``), as PEFT's ``OFTConfig``
computes it (0.21: Cayley–Neumann series by default).
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
from ..layers import CONV, CONV1D_GPT2, EMBEDDING, LINEAR, kind_of, widths
from ..merging import stored
from ..sites import InputSite, OutputSite, WeightSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method, tensor_options
from ._orthogonal import PEFT_OFT_BLOCK_SIZE, cayley, nearest_divisor, rotate, skew_from_upper

INITS = ("default", "random")


def rotated_width(module: nn.Module) -> int:
    """The width ``R`` acts on: a dense layer's input features, a convolution's filter
    (``in/groups × kernel``), an embedding's vectors."""
    kind = kind_of(module)
    if kind == EMBEDDING:
        return module.embedding_dim
    return widths(module)[0]


def rotation(vector: torch.Tensor, size: int, terms: int | None) -> torch.Tensor:
    """The blocks of ``R`` as one butterfly level, ``(1, blocks, size, size)``, in float32
    or wider."""
    exact = torch.promote_types(vector.dtype, torch.float32)
    return cayley(skew_from_upper(vector.to(exact), size), terms)[None]


def rotate_input(size: int, terms: int | None, module: nn.Module, x, tensors):
    """``x R`` on the input features."""
    (vector,) = tensors
    return rotate(x, rotation(vector, size, terms).to(x.dtype))


def rotate_output(size: int, terms: int | None, module: nn.Module, x, y, tensors, writable):
    """An embedding's vectors ``e R``."""
    (vector,) = tensors
    return rotate(y, rotation(vector, size, terms).to(y.dtype))


def rotate_weight(size: int, terms: int | None, weight: torch.Tensor, tensors) -> torch.Tensor:
    """A convolution's ``W Rᵀ`` with each filter flattened (``in/groups × kernel``)."""
    (vector,) = tensors
    blocks = rotation(vector, size, terms).to(weight.dtype)
    return rotate(weight.flatten(1), blocks, transpose=True).view_as(weight)


def oft_weight(kind: str, size: int, terms: int | None, weight: torch.Tensor, tensors):
    """The weight with ``R`` folded in, in its own layout: the weight site of a layer the
    model reads without calling it."""
    (vector,) = tensors
    return rotated_weight(kind, weight, rotation(vector, size, terms).to(weight.dtype))


def rotated_weight(kind: str, weight: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """The stored weight of a layer of ``kind`` with ``M`` folded in (``blocks``: its
    butterfly levels, see :func:`~deltahooks.methods._orthogonal.rotate`)."""
    if kind == EMBEDDING:  # rows are the vectors: E M
        return rotate(weight, blocks)
    if kind == CONV1D_GPT2:  # (in, out): M Wᵀ
        return rotate(weight.t(), blocks, transpose=True).t()
    return rotate(weight.flatten(1), blocks, transpose=True).view_as(weight)  # W Mᵀ


def merged(kind: str, size: int, terms: int | None, module: nn.Module, tensors) -> dict:
    weight = stored(module, "weight")
    exact = torch.promote_types(weight.dtype, torch.float32)
    blocks = rotation(tensors["oft_R"], size, terms).to(exact)
    return {"weight": rotated_weight(kind, weight.to(exact), blocks).to(weight.dtype)}


@register_method
@dataclass(frozen=True, kw_only=True)
class OFT(DeltaSpec):
    """Orthogonal finetuning: rotate the input space of each target's weight.

    OFT (Qiu et al., 2023, "Controlling Text-to-Image Diffusion by Orthogonal
    Finetuning"; PEFT ``OFTConfig``) replaces a layer's weight ``W`` (``out × in``) by
    ``W Rᵀ``, ``R`` block-diagonal with ``in / block_size`` orthogonal blocks. Each block
    is the Cayley transform ``(I - Q)(I + Q)⁻¹`` of a skew-symmetric ``Q`` whose strict
    upper triangle is learned (``oft_R``: ``(blocks, block_size·(block_size-1)/2)``,
    PEFT's layout), so the angles between the weight's rows, and their norms, are kept.
    ``Q`` starts at zero: the outputs are unchanged at attach. Where it acts: a dense
    layer (``nn.Linear``, GPT-2 ``Conv1D``) rotates its input (``x ↦ x R``, PEFT's way:
    measured cheaper to train than a weight parametrization, which would need the full
    weight gradient), an ``nn.Embedding`` rotates its output vectors, a convolution
    (``nn.Conv1d/2d/3d``) gets its weight rotated per filter (``in/groups × kernel``
    wide) through a parametrization. ``delta.merge()`` folds ``R`` into the weight.
    Every argument is keyword-only and checked when the spec is created.

    Args:
        targets: which layers to rotate, in the target syntax of :func:`deltahooks.attach`
            (name suffix, glob, ``"re:"`` regex, ``"all-linear"``, module class, callable,
            ``dh.Paths`` or a list of these), e.g. ``["q_proj", "v_proj"]``. Each must be
            ``nn.Linear``, GPT-2 ``Conv1D``, ``nn.Conv1d/2d/3d`` or ``nn.Embedding``; any
            other module raises :class:`deltahooks.UnsupportedModuleError` at attach.
            PEFT: ``target_modules`` (PEFT takes Linear, Conv2d and Embedding).
        exclude: layers to leave out of ``targets``, same syntax. Default ``None``. PEFT:
            ``exclude_modules``.
        block_size: the size of each orthogonal block; it must divide every target's
            rotated width (else :class:`deltahooks.SpecError` at attach). Default
            ``None``: per target, the divisor of its width nearest to 32 (PEFT's default
            ``oft_block_size=32``), ties to the smaller one, the whole width when it is
            at most 32; this is PEFT's own adjustment rule, so the default is valid for
            any width (a prime width above 63 gets blocks of 1: no rotation). PEFT:
            ``oft_block_size`` (which PEFT adjusts silently, with a warning, where it does
            not divide; ``r``, the number of blocks, is ``width / block_size``).
        use_cayley_neumann: compute ``(I + Q)⁻¹`` by a truncated Neumann series (fast,
            approximately orthogonal) instead of solving exactly. Default ``True``, as
            PEFT 0.21's ``use_cayley_neumann``.
        num_cayley_neumann_terms: how many series terms, ``I + 2Q + … + 2Qⁿ⁻² + Qⁿ⁻¹``
            (PEFT's formula). Default 5, as PEFT's ``num_cayley_neumann_terms``.
        init: ``"default"``: ``Q = 0``, outputs unchanged at attach (PEFT
            ``init_weights=True``). ``"random"``: entries normal with standard deviation
            0.1 (PEFT ``init_weights=False``), for tests. Default ``"default"``.

    PEFT's ``coft``/``eps`` (a projection written into the parameter during forward) and
    ``block_share`` are not implemented; :func:`deltahooks.load_peft` refuses adapters
    that use them. PEFT 0.21's ``module_dropout`` is never applied in its forward, so
    adapters with it load as they compute.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(48, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        >>> delta = dh.attach(model, dh.OFT(targets=["0", "2"]))
        >>> {key: tuple(t.shape) for key, t in delta.state_dict().items()}
        {'0.oft_R': (2, 276), '2.oft_R': (1, 28)}
    """

    method = "oft"
    layer_kinds = (LINEAR, CONV1D_GPT2, CONV, EMBEDDING)
    block_size: int | None = None
    use_cayley_neumann: bool = True
    num_cayley_neumann_terms: int = 5
    init: Literal["default", "random"] = "default"

    def validate(self) -> None:
        validate.optional_positive_int(self, "block_size", self.block_size, example=32)
        validate.flag(self, "use_cayley_neumann", self.use_cayley_neumann)
        validate.positive_int(self, "num_cayley_neumann_terms", self.num_cayley_neumann_terms, 5)
        validate.one_of(self, "init", self.init, INITS)

    def check_module(self, path: str, module: nn.Module) -> None:
        if not self.takes_kind(module):
            raise UnsupportedModuleError(
                f"OFT cannot rotate {path or '<root>'!r} ({type(module).__name__}); it supports "
                "nn.Linear, transformers Conv1D, nn.Conv1d/2d/3d and nn.Embedding. Narrow "
                "targets (e.g. exclude=...) or target the linear layers inside it"
            )
        width = rotated_width(module)
        if self.block_size is not None and width % self.block_size:
            divisors = [d for d in range(2, min(width, 64) + 1) if width % d == 0][:6]
            raise SpecError(
                f"OFT block_size={self.block_size} does not divide the width {width} that "
                f"{path or '<root>'!r} rotates; pass a divisor (e.g. {divisors}) or "
                "block_size=None to choose one per layer"
            )

    def size_for(self, module: nn.Module) -> int:
        """The block size on ``module`` (see ``block_size``)."""
        width = rotated_width(module)
        return self.block_size or nearest_divisor(width, PEFT_OFT_BLOCK_SIZE)

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        kind, width, size = kind_of(module), rotated_width(module), self.size_for(module)
        vector = torch.zeros(
            width // size, size * (size - 1) // 2, **tensor_options(module, device)
        )
        if device is None and self.init == "random":
            with torch.no_grad():
                vector.normal_(0.0, 0.1)
        terms = self.num_cayley_neumann_terms if self.use_cayley_neumann else None
        direct = kind != CONV and needs_weight_site(self, path, module, root)
        if kind == CONV:  # a filter's inputs overlap between positions: rotate the weight
            site, order = WeightSite(partial(rotate_weight, size, terms), "weight", ("oft_R",)), 0
        elif direct:  # the model reads the weight without calling the layer: rotate it there
            site = WeightSite(partial(oft_weight, kind, size, terms), "weight", ("oft_R",))
            order = 0
        elif kind == EMBEDDING:
            site, order = OutputSite(partial(rotate_output, size, terms), ("oft_R",)), 2
        else:
            site, order = InputSite(partial(rotate_input, size, terms), ("oft_R",)), 2
        # A product with the weight, like a scale of the layer: it merges only while no
        # other unmerged delta acts on this layer; after the additive updates of the same
        # delta that its input/output site sees (order 2), before those a weight site does not.
        return Part(
            path,
            {"oft_R": vector},
            [site],
            merge=partial(merged, kind, size, terms),
            merge_order=order,
            exclusive_merge=True,
            note=WHY if direct else "",
        )
