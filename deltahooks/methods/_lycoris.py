"""What LoHa and LoKr share: which layers they take, per-target rank and alpha, and merging.

Both are functions of the weight, ``W ↦ W + ΔW(factors)``, installed as a weight site;
merging evaluates the same function once, in at least float32, on the stored weight.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from .. import validate
from ..errors import UnsupportedModuleError
from ..merging import stored
from ..targets import first_match


def validate_rank_and_alpha(owner: str, spec) -> None:
    """``r``/``alpha`` and their ``rank_pattern``/``alpha_pattern`` overrides."""
    validate.pattern_dict(owner, "rank_pattern", spec.rank_pattern, "{'down_proj': 4}")
    validate.pattern_dict(owner, "alpha_pattern", spec.alpha_pattern, "{'down_proj': 16}")
    for where, rank in [("r", spec.r), *spec.rank_pattern.items()]:
        validate.positive_int(owner, where, rank)
    for where, alpha in [("alpha", spec.alpha), *spec.alpha_pattern.items()]:
        validate.finite(owner, where, alpha, minimum=0)


def rank_and_scale(spec, path: str, module: nn.Module, root: nn.Module) -> tuple[int, float]:
    """The target's rank and its scale ``alpha / r`` (PEFT's LyCORIS scaling)."""
    rank = first_match(path, module, spec.rank_pattern, root) or spec.r
    alpha = first_match(path, module, spec.alpha_pattern, root)
    alpha = spec.alpha if alpha is None else alpha
    return rank, alpha / rank


def refuse(owner: str, path: str, module: nn.Module, supported: str) -> None:
    raise UnsupportedModuleError(
        f"{owner} cannot adapt {path or '<root>'!r} ({type(module).__name__}); it supports "
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
