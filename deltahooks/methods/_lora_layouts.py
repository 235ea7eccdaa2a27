"""LoRA's update in a layer's own weight layout: ``W + s · BA``, ``s · BA`` and the weight it
adds to; shared by LoRA and its DoRA variant.

A Linear stores its weight ``out × in``, GPT-2's Conv1D and an Embedding ``in × out``
(channels are columns), a convolution ``out × in × k…``; ``A`` and ``B`` keep PEFT's
layouts whatever the layer, so these functions form the product in the weight's layout.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import warn
from ..layers import CONV1D_GPT2, EMBEDDING, LINEAR, to_weight_layout
from ..merging import stored
from . import lora_parameters


def lora_weight(kind: str, scale: float, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``W + s · BA`` in the weight's own layout: the weight site of a layer the model
    reads without calling it (one fused multiply-add; autograd keeps only ``A``, ``B``)."""
    a, b = tensors
    if kind == LINEAR:
        return lora_parameters.updated_weight(False, scale, weight, tensors)
    if kind in (CONV1D_GPT2, EMBEDDING):  # stored in × out: (BA)ᵀ = AᵀBᵀ
        return torch.addmm(weight, a.t(), b.t(), alpha=scale)
    flat = torch.addmm(weight.flatten(1), b.flatten(1), a.flatten(1), alpha=scale)
    return flat.view_as(weight)


def delta_weight(scale: float, module: nn.Module, tensors) -> torch.Tensor:
    """``s · BA`` in the layout of the module's own weight, in at least float32."""
    exact = torch.promote_types(stored(module, "weight").dtype, torch.float32)
    a, b = tensors["lora_A"].to(exact), tensors["lora_B"].to(exact)
    return to_weight_layout(module, b.flatten(1) @ a.flatten(1)) * scale


def base_weight(module: nn.Module, tensors) -> torch.Tensor:
    """What the update adds to: PiSSA/OLoRA's residual, else the stored weight (not a Full
    copy, not a parametrization)."""
    residual = tensors.get("weight")
    return stored(module, "weight") if residual is None else residual


def channel_rows(kind: str, weight: torch.Tensor) -> torch.Tensor:
    """The weight as ``out × in`` (a view): one row per output channel."""
    if kind in (CONV1D_GPT2, EMBEDDING):
        return weight.t()
    return weight.flatten(1)


def to_weight_layout_of(kind: str, matrix: torch.Tensor) -> torch.Tensor:
    """An out × in matrix in a Linear's or GPT-2 Conv1D's own layout."""
    return matrix.t() if kind == CONV1D_GPT2 else matrix


def warn_dropout(path: str, dropout: float, device) -> None:
    """A weight site folds the update into ``W``, where dropout on the input has no place."""
    if dropout and device is None:
        warn(
            f"LoRA dropout={dropout} does not apply on {path!r}: the model reads its weight "
            "directly instead of calling it, so the update is folded into the weight "
            "(W + sBA), where dropout on the layer's input has no place; exclude it to keep "
            "dropout everywhere else, or accept it without dropout there"
        )
