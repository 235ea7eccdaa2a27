"""What the bottleneck adapters share: ``y + s · up(act(down(source)))`` and its checks.

``Adapter``, ``ParallelAdapter``, ``LowRankAdapter`` and ``Compacter`` differ only in what
``source`` is (the module's output, or its input) and in how ``down``/``up`` are built
(plain matrices, rank-r products, sums of Kronecker products); the residual, the
activations and the width checks live here once.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SpecError, UnsupportedModuleError
from ..layers import CONV, EMBEDDING, kind_of, output_width
from ..validate import name_of

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def bottleneck(module, activation: str, scale: float, source, y, down, down_bias, up, up_bias):
    """``y + scale · up(act(down(source)))``; weights in ``F.linear``'s out × in layout.

    ``source`` is ``y`` (an adapter on the output) or the module's input; a tensor that does
    not fit the plan raises a clear error (:func:`check_fits`) instead of torch's.
    """
    if source.shape[-1] != down.shape[1] or y.shape[-1] != up.shape[0]:
        check_fits(module, source, y, down.shape[1], up.shape[0])
    elif source is not y and source.shape[:-1] != y.shape[:-1]:
        check_fits(module, source, y, down.shape[1], up.shape[0])
    update = F.linear(ACTIVATIONS[activation](F.linear(source, down, down_bias)), up, up_bias)
    return y + (update if scale == 1.0 else update * scale)


def check_fits(module: nn.Module, source, y, fan_in: int, fan_out: int) -> None:
    """Raise :class:`~deltahooks.UnsupportedModuleError` saying why ``source``/``y`` do not fit.

    A bottleneck reads and writes the last dimension of ``(..., width)`` tensors: a module
    that keeps its channels first (ConvNeXt's stages: ``(N, C, H, W)``) or one whose output
    has other leading dimensions than its input (Swin's stages merge patches) cannot take
    one; the error names the shapes and what to target instead.
    """
    name = type(module).__name__
    for what, tensor, width in (("output", y, fan_out), ("input", source, fan_in)):
        if tensor.shape[-1] == width:
            continue
        first = [d for d in range(1, tensor.dim() - 1) if tensor.shape[d] == width]
        where = f"a bottleneck adapter acts on the last dimension of {name}'s {what}"
        if first:
            raise UnsupportedModuleError(
                f"{where}, which has shape {tuple(tensor.shape)}: its {width} channels are on "
                f"dimension {first[0]} (channels first); target modules whose {what} keeps "
                f"its channels last (the Linear layers inside {name}, say)"
            )
        raise UnsupportedModuleError(
            f"{where}, which has shape {tuple(tensor.shape)}, but it was planned for "
            f"(..., {width}) tensors (from the module's Linear layers, hidden_size= or "
            f"config.hidden_size); pass hidden_size=... or target a module whose {what} is "
            "its (..., width) hidden state"
        )
    raise UnsupportedModuleError(
        f"a ParallelAdapter adds a function of {name}'s input {tuple(source.shape)} to its "
        f"output {tuple(y.shape)}, whose leading dimensions differ ({name} changes the number "
        "of tokens, as a patch-merging stage does); target modules that keep them (the blocks "
        f"inside {name})"
    )


def plain_pair(
    prefix: str,
    fan_in: int,
    fan_out: int,
    size: int,
    options: dict,
    *,
    build: bool,
    random_up: bool,
) -> dict[str, torch.Tensor]:
    """``{prefix}_down``/``_down_bias``/``_up``/``_up_bias`` of a plain bottleneck.

    ``down`` starts like a default ``nn.Linear``; ``up`` and the biases start at zero, so the
    adapter starts as the identity (``random_up``: ``up`` non-zero, for tests). With
    ``build=False`` (a plan) the tensors are shapes only.
    """
    down = torch.empty(size, fan_in, **options)
    up = torch.zeros(fan_out, size, **options)
    if build:
        with torch.no_grad():
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            if random_up:
                nn.init.normal_(up, std=1.0 / math.sqrt(size))
    return {
        f"{prefix}_down": down,
        f"{prefix}_down_bias": torch.zeros(size, **options),
        f"{prefix}_up": up,
        f"{prefix}_up_bias": torch.zeros(fan_out, **options),
    }


def check_hidden_size(owner: object, hidden_size: int | None, path: str, module: nn.Module) -> None:
    """A ``hidden_size`` that contradicts the module's own output width is a mistake."""
    known = output_width(module)
    if hidden_size is not None and known is not None and hidden_size != known:
        raise SpecError(
            f"{name_of(owner)} hidden_size={hidden_size} does not fit {path!r} "
            f"({type(module).__name__}), whose output is {known} wide; drop hidden_size=... "
            "(it is read from the module)"
        )


def check_bottleneck(owner: object, size: int, width: int, path: str, what: str = "hidden size"):
    if size > width:
        raise SpecError(
            f"{name_of(owner)} bottleneck={size} is larger than the {what} {width} of {path!r}: a "
            f"bottleneck must be narrower than its input; use bottleneck <= {width}"
        )


def refuse_kinds(owner: object, path: str, module: nn.Module, kinds=(CONV,)) -> None:
    """Bottleneck adapters act on the last dimension: not a convolution's channels."""
    if kind_of(module) in kinds:
        what = "token ids" if kind_of(module) == EMBEDDING else "channels first"
        raise UnsupportedModuleError(
            f"{name_of(owner)} acts on the last dimension of (..., width) tensors, but {path!r} "
            f"({type(module).__name__}) works on {what}; target another module"
        )


def reduced(width: int, reduction_factor: int, multiple: int = 1) -> int:
    """``width // reduction_factor``, at least 1, rounded up to a multiple of ``multiple``."""
    size = max(width // reduction_factor, 1)
    return -(-size // multiple) * multiple


@torch.no_grad()
def init_factors(left: torch.Tensor, right: torch.Tensor, fan_in: int, terms: int = 1) -> None:
    """Factors of ``W = Σ_terms left · rightᵀ`` (rank ``r`` = last dim) drawn so that ``W``
    starts with the variance of a default ``nn.Linear`` weight, ``1 / (3 · fan_in)``."""
    rank = left.shape[-1]
    left.normal_(std=1.0 / math.sqrt(rank))
    right.normal_(std=1.0 / math.sqrt(3 * fan_in * terms))
