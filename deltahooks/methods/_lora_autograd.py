"""LoRA's update with dropout, ``s · B(A(dropout(x)))``, saving a mask instead of a copy.

Plain autograd keeps ``dropout(x)`` (tokens × fan-in, the activations' dtype) for the
gradient of ``A``, one copy per adapted layer, on top of the dropout mask: for q/k/v that
is three copies of one input. This function keeps the input itself (one tensor, shared
by every layer that reads it and usually kept by the model anyway), the dropout mask
(one bit per element) and the rank-r activation ``h``, and rebuilds ``dropout(x)`` in
backward. Used in training with dropout > 0 only: without dropout plain autograd already
keeps just ``x`` and ``h``.
"""

from __future__ import annotations

import torch

BITS = 8


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as one bit per element (uint8, padded to a multiple of 8)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % BITS
    if pad:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    weights = torch.tensor([1 << i for i in range(BITS)], dtype=torch.uint8, device=mask.device)
    return (flat.view(-1, BITS).to(torch.uint8) * weights).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor :func:`pack_bits` packed, of ``shape``."""
    shifts = torch.arange(BITS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts) & 1
    return bits.reshape(-1)[: shape.numel()].view(shape).bool()


class DroppedLowRank(torch.autograd.Function):
    """``s · (dropout(x) Aᵀ) Bᵀ`` for 2-D ``x`` (tokens × fan-in); see the module docstring."""

    @staticmethod
    def forward(ctx, x, a, b, scale: float, p: float):
        dropped, keep = torch.native_dropout(x, p, True)
        h = dropped @ a.t()
        ctx.save_for_backward(x, pack_bits(keep), a, b, h)
        ctx.scale, ctx.p = scale, p
        return (h @ b.t()) * scale

    @staticmethod
    def backward(ctx, grad):
        x, packed, a, b, h = ctx.saved_tensors
        keep = unpack_bits(packed, x.shape)
        factor = 1.0 / (1.0 - ctx.p)
        grad = grad * ctx.scale
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = grad.t() @ h
        grad_h = grad @ b
        if ctx.needs_input_grad[1]:
            grad_a = grad_h.t() @ (x * keep * factor)
        if ctx.needs_input_grad[0]:
            grad_x = (grad_h @ a) * keep * factor
        return grad_x, grad_a, grad_b, None, None


def dropped_low_rank(x: torch.Tensor, a, b, scale: float, p: float) -> torch.Tensor:
    """The update for ``x`` of any leading shape (flattened to tokens × fan-in)."""
    flat = x.reshape(-1, x.shape[-1]).to(a.dtype)  # one dtype inside (autocast ends at backward)
    return DroppedLowRank.apply(flat, a, b, scale, p).view(*x.shape[:-1], b.shape[0])
