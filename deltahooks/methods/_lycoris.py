"""What LoHa and LoKr share: which layers they take, and merging.

Both are functions of the weight, ``W ↦ W + ΔW(factors)``, installed as a weight site;
merging evaluates the same function once, in at least float32, on the stored weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ..errors import UnsupportedModuleError
from ..merging import stored
from ..validate import name_of


def refuse(owner: object, path: str, module: nn.Module, supported: str) -> None:
    raise UnsupportedModuleError(
        f"{name_of(owner)} cannot adapt {path or '<root>'!r} ({type(module).__name__}); it supports "
        f"{supported}. Narrow targets (e.g. exclude=...) or target the layers inside it"
    )


def merged_weight(
    weight_fn: Callable, names: tuple[str, ...], module: nn.Module, tensors
) -> dict[str, torch.Tensor]:
    """The site's own function on the stored weight, computed in at least float32."""
    weight = stored(module, "weight")
    exact = torch.promote_types(weight.dtype, torch.float32)
    factors = tuple(tensors[name].to(exact) for name in names)
    return {"weight": weight_fn(weight.to(exact), factors).to(weight.dtype)}
