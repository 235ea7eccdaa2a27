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

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh, "silu": F.silu}


def bottleneck(activation: str, scale: float, source, y, down, down_bias, up, up_bias):
    """``y + scale · up(act(down(source)))``; weights in ``F.linear``'s out × in layout."""
    update = F.linear(ACTIVATIONS[activation](F.linear(source, down, down_bias)), up, up_bias)
    return y + (update if scale == 1.0 else update * scale)


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


def check_hidden_size(owner: str, hidden_size: int | None, path: str, module: nn.Module) -> None:
    """A ``hidden_size`` that contradicts the module's own output width is a mistake."""
    known = output_width(module)
    if hidden_size is not None and known is not None and hidden_size != known:
        raise SpecError(
            f"{owner} hidden_size={hidden_size} does not fit {path!r} "
            f"({type(module).__name__}), whose output is {known} wide; drop hidden_size=... "
            "(it is read from the module)"
        )


def check_bottleneck(owner: str, size: int, width: int, path: str, what: str = "hidden size"):
    if size > width:
        raise SpecError(
            f"{owner} bottleneck={size} is larger than the {what} {width} of {path!r}: a "
            f"bottleneck must be narrower than its input; use bottleneck <= {width}"
        )


def refuse_kinds(owner: str, path: str, module: nn.Module, kinds=(CONV,)) -> None:
    """Bottleneck adapters act on the last dimension: not a convolution's channels."""
    if kind_of(module) in kinds:
        what = "token ids" if kind_of(module) == EMBEDDING else "channels first"
        raise UnsupportedModuleError(
            f"{owner} acts on the last dimension of (..., width) tensors, but {path!r} "
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
