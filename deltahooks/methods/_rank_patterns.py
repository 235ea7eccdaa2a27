"""Per-target rank and alpha: ``r``/``alpha`` and their ``rank_pattern``/``alpha_pattern``
overrides, read the same way by LoRA, LoHa and LoKr (as PEFT reads them)."""

from __future__ import annotations

import math

from torch import nn

from .. import validate
from ..targets import first_match


def validate_rank_and_alpha(spec) -> None:
    """``r``/``alpha`` and their ``rank_pattern``/``alpha_pattern`` overrides."""
    validate.pattern_dict(spec, "rank_pattern", spec.rank_pattern, "{'down_proj': 4}")
    validate.pattern_dict(spec, "alpha_pattern", spec.alpha_pattern, "{'down_proj': 16}")
    for where, rank in [("r", spec.r), *spec.rank_pattern.items()]:
        validate.positive_int(spec, where, rank)
    for where, alpha in [("alpha", spec.alpha), *spec.alpha_pattern.items()]:
        validate.finite(spec, where, alpha, minimum=0)


def rank_and_scale(
    spec, path: str, module: nn.Module, root: nn.Module, *, rslora: bool = False
) -> tuple[int, float]:
    """The target's rank (the first ``rank_pattern`` key that matches it, else ``r``) and
    its scale ``alpha / r``, or ``alpha / √r`` with ``rslora``."""
    rank = first_match(path, module, spec.rank_pattern, root) or spec.r
    alpha = first_match(path, module, spec.alpha_pattern, root)
    alpha = spec.alpha if alpha is None else alpha
    return rank, alpha / math.sqrt(rank) if rslora else alpha / rank
