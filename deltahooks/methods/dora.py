"""DoRA (Liu et al., 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"), spelled
``dh.LoRA(dora=True)``: each output channel of ``W + sBA`` is rescaled to a learned
magnitude ``m``,

    ``W' = m ⊙ (W + sBA) / ‖W + sBA‖``

with the norm per output channel, treated as a constant in backward (the paper's section
4.3, as PEFT does). It is computed on the layer's output, like PEFT:
``y + (m/‖·‖ - 1) ⊙ (Wx) + (m/‖·‖) ⊙ sBAx``; a layer the model reads without calling it
gets ``W'`` through a weight site instead.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from ..direct_reads import WHY
from ..layers import (
    CONV,
    CONV1D_GPT2,
    EMBEDDING,
    LINEAR,
    along_channels,
    channel_dim,
    to_weight_layout,
    widths,
)
from ..sites import OutputSite, WeightSite
from ..spec import Part
from ._lora_layouts import base_weight, channel_rows, delta_weight, lora_weight


def weight_norm(kind: str, scale: float, weight, a, b) -> torch.Tensor:
    """``‖W + sBA‖`` per output channel, shape ``(out,)``, outside autograd (DoRA §4.3).

    Formed in the weight's own layout (one ``addmm``, no transposed copy of ``W``).
    """
    weight, a, b = weight.detach(), a.detach(), b.detach()
    if kind == LINEAR:
        return torch.linalg.vector_norm(torch.addmm(weight, b, a, alpha=scale), dim=1)
    if kind == CONV:
        full = torch.addmm(weight.flatten(1), b.flatten(1), a.flatten(1), alpha=scale)
        return torch.linalg.vector_norm(full, dim=1)
    # GPT-2 Conv1D (in × out) and Embedding (num_embeddings × dim): channels are columns
    return torch.linalg.vector_norm(torch.addmm(weight, a.t(), b.t(), alpha=scale), dim=0)


def dora_weight(kind: str, scale: float, weight: torch.Tensor, tensors) -> torch.Tensor:
    """``m ⊙ (W + sBA) / ‖W + sBA‖`` per output channel (the norm a constant in backward),
    in the weight's layout: DoRA's weight site."""
    a, b, magnitude = tensors
    factor = magnitude.reshape(-1) / weight_norm(kind, scale, weight, a, b)
    full = lora_weight(kind, scale, weight, (a, b))
    if kind in (CONV1D_GPT2, EMBEDDING):  # channels are columns
        return full * factor
    return full * factor.view(-1, *([1] * (full.dim() - 1)))


def dora_bypass(kind: str, scale: float, dropout: float, module, x, y, tensors, writable):
    """``y + (f - 1) ⊙ Wx + f ⊙ sBAx`` with ``f = m / ‖W + sBA‖`` per output channel.

    Written as PEFT writes it, so that ``f = 1`` and ``B = 0`` give back ``y`` bit for
    bit. ``f`` is folded into ``B`` (``out × r``, cheap) rather than applied to the
    ``tokens × out`` LoRA output. With dropout in training, ``Wx`` is recomputed from
    the dropped input, as in PEFT.
    """
    a, b, magnitude = tensors
    weight = module.weight
    factor = magnitude.reshape(-1) / weight_norm(kind, scale, weight, a, b)
    dim = channel_dim(module)
    b = b * (factor * scale).view(-1, *([1] * (b.dim() - 1)))
    bias = None if kind == EMBEDDING else module.bias
    if dropout and module.training:
        x = F.dropout(x, dropout, True)
        if kind == CONV:
            base = module._conv_forward(x, weight, None)
        else:
            base = F.linear(x, weight if kind == LINEAR else weight.t())
    elif bias is None:
        base = y
    else:
        base = y - along_channels(bias, dim, y.dim())
    w = base * along_channels(factor - 1, dim, base.dim())
    if kind == CONV:
        conv = (F.conv1d, F.conv2d, F.conv3d)[a.dim() - 3]
        w.add_(conv(module._conv_forward(x, a, None), b))
    elif kind == EMBEDDING:
        w = _add_lora(w, F.embedding(x, a.t(), module.padding_idx), b)
    else:
        w = _add_lora(w, F.linear(x, a), b)
    # y itself is kept for backward (by the product above) only when it was ``base``
    if writable and base is not y:
        return y.add_(w)
    return y + w


def _add_lora(w: torch.Tensor, h: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``w + h Bᵀ`` over the last dimension, into ``w`` (a fresh tensor) where it can."""
    h = h.reshape(-1, h.shape[-1])
    if w.is_contiguous():
        w.view(-1, w.shape[-1]).addmm_(h, b.t())
        return w
    return torch.addmm(w.reshape(-1, w.shape[-1]), h, b.t()).view(w.shape)


def dora_merged_weight(kind: str, scale: float, module: nn.Module, tensors) -> dict:
    """``m ⊙ (W + sBA) / ‖W + sBA‖`` in the weight's layout; the bias is unchanged."""
    weight = base_weight(module, tensors)
    full = weight.to(torch.promote_types(weight.dtype, torch.float32))
    full = full + delta_weight(scale, module, tensors)
    rows = channel_rows(kind, full)
    factor = tensors["lora_magnitude_vector"].reshape(-1).to(full.dtype)
    factor = factor / torch.linalg.vector_norm(rows, dim=1)
    merged = rows * factor[:, None]
    return {"weight": to_weight_layout(module, merged).to(weight.dtype)}


def dora_part(
    path: str,
    module: nn.Module,
    tensors: dict,
    kind: str,
    scale: float,
    dropout: float,
    device,
    extra: dict,
    direct: bool = False,
) -> Part:
    """LoRA's part on ``path`` (``tensors``: its ``A``, ``B``, and PiSSA/OLoRA's residual)
    with DoRA's magnitude added and its site in place of LoRA's."""
    weight = tensors.get((path, "weight"), (module.weight,))[0]  # PiSSA's residual
    out = widths(module)[1]
    shape = (1, out, *([1] * (weight.dim() - 2))) if kind == CONV else (out,)
    like = {"device": weight.device if device is None else device, "dtype": weight.dtype}
    magnitude = torch.empty(shape, **like)
    if device is None:  # ‖W + sBA‖ per output channel: m / ‖·‖ = 1 at attach
        norm = weight_norm(kind, scale, weight, tensors["lora_A"], tensors["lora_B"])
        magnitude.copy_(norm.view(shape))
    tensors["lora_magnitude_vector"] = magnitude
    # An output site, not a weight site: W' as a parametrized weight would make
    # autograd form the full out × in gradient of W' (one more GEMM as large as the
    # forward's) in every training step; on the output the magnitude's gradient is a
    # per-channel reduction. Timed (CPU, 1 thread, 1024² Linear, 512 tokens, median of
    # 20 interleaved rounds): train step 1.6x slower as a weight site, forward 0.94-0.99x.
    names = ("lora_A", "lora_B", "lora_magnitude_vector")
    if direct:  # the model reads the weight without calling the layer
        site = WeightSite(partial(dora_weight, kind, scale), "weight", names)
    else:
        site = OutputSite(
            partial(dora_bypass, kind, scale, dropout), names, in_place=True, prepend=True
        )
    # a scale of the layer's channels: exact to merge only while no other unmerged
    # delta adds to the same layer (its update would be rescaled too, or not)
    return Part(
        path,
        tensors,
        [*extra.get("sites", []), site],
        merge=partial(dora_merged_weight, kind, scale),
        merge_order=2,
        exclusive_merge=True,
        unsaved=extra.get("unsaved", ()),
        note=WHY if direct else "",
    )
