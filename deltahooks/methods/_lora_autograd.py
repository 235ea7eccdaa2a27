"""LoRA's update in training, ``y + s · B(A(dropout(x)))``: a mask instead of a copy, and
GEMM layouts chosen for speed.

Plain autograd keeps ``dropout(x)`` (tokens × fan-in, the activations' dtype) for the
gradient of ``A``, one copy per adapted layer, on top of the dropout mask: for q/k/v that
is three copies of one input. This function keeps the input itself (one tensor, shared
by every layer that reads it and usually kept by the model anyway), the dropout mask
(one bit per element) and the rank-r activation ``h``, and rebuilds ``dropout(x)`` in
backward. Without dropout it keeps what plain autograd would (``x`` and ``h``) but computes
the backward with faster GEMM layouts (see :class:`LowRankUpdate`).

The mask is drawn here, not by ``torch.native_dropout``: 16 random bits per element, taken
four at a time from 64-bit draws of the device's default generator, compared with
``round(p · 2¹⁶)``. That is about four times faster on CPU than a Bernoulli draw per element
(dropout was the largest part of the step with ``dropout=0.05``), at the price of ``p``
being rounded to a multiple of 2⁻¹⁶ (0.05 → 0.0500031; kept values are scaled by the
rounded ``1/(1-p)``, so the update stays unbiased). Masks therefore differ from
``F.dropout``'s (and PEFT's) for the same seed; they follow ``torch.manual_seed`` and the
RNG state that gradient checkpointing restores, so a replayed layer draws the same mask.

Transient memory counts too (it is what raises the peak at the top of backward): the
scale and the dropout factor are applied to the rank-r tensors, never to a tokens × width
one, the mask is packed and unpacked through views and in-place ops, and the update is
accumulated into a single output with ``addmm``.
"""

from __future__ import annotations

import torch

BITS = 8
SPREAD = (1 << 3) | (1 << 10) | (1 << 17) | (1 << 24)  # byte k's low bit -> bit 24 + k
RESOLUTION = 1 << 16  # dropout probabilities are multiples of 2⁻¹⁶


def drop_threshold(p: float) -> int:
    """How many of the 2¹⁶ values of a 16-bit draw drop an element (at least 1 of them
    keeps it)."""
    return min(round(p * RESOLUTION), RESOLUTION - 1)


def draw_keep(shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """A bool mask of ``shape``, each element False with probability
    ``drop_threshold(p) / 2¹⁶``, independently; from the device's default generator."""
    n = shape.numel()
    words = torch.empty((n + 3) // 4, dtype=torch.int64, device=device)
    words.random_(-(1 << 63), (1 << 63) - 1)  # 4 uniform 16-bit draws per word
    draws = words.view(torch.int16)[:n].view(shape)
    return draws >= drop_threshold(p) - RESOLUTION // 2  # int16 spans [-2¹⁵, 2¹⁵)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor as one bit per element (uint8, padded to a multiple of 8).

    Eight bools are the eight bytes of one int64 word; each half-word times ``SPREAD``
    gathers its four 0/1 bytes into bits 24-27 (the partial products never carry into
    them and never leave 64 bits, so there is no overflow), one nibble per half.
    """
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % BITS
    if pad or flat.storage_offset() % BITS:
        flat = torch.cat((flat, flat.new_zeros(pad)))
    words = flat.view(torch.uint8).view(torch.int64)  # bools are bytes of 0 or 1; little-endian
    # (as on every platform torch ships for but s390x), which the round-trip test checks
    low = (words & 0xFFFFFFFF).mul_(SPREAD).bitwise_right_shift_(24).bitwise_and_(0x0F)
    high = (words >> 32).mul_(SPREAD).bitwise_right_shift_(20).bitwise_and_(0xF0)
    return low.bitwise_or_(high).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """The bool tensor :func:`pack_bits` packed, of ``shape``."""
    shifts = torch.arange(BITS, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(1) >> shifts).bitwise_and_(1)  # one byte per element, 0 or 1
    return bits.view(torch.bool).reshape(-1)[: shape.numel()].view(shape)


FAST_BACKWARD_MIN = 1 << 16  # input elements (tokens × fan-in) from which it pays off


def pays_off(x: torch.Tensor) -> bool:
    """Whether :class:`LowRankUpdate` beats plain autograd without dropout.

    Its backward runs in Python, ~40 µs per layer more than autograd's nodes, and saves
    100-900 µs per layer on CPU at 512 tokens × 512-1376 wide; on small inputs, and on
    GPUs (whose GEMMs take any layout at full speed), plain autograd is faster.
    """
    return x.device.type == "cpu" and x.numel() >= FAST_BACKWARD_MIN


def outer(grad_h: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """``grad_h A`` (tokens × r times r × fan-in): the rank-r product of the input gradient.

    On CPU a plain ``mm`` of this shape (inner dimension r) takes a slow path for fan-in
    ≥ 1024 (~880 µs against ~165 µs at 512 × 8 × 1376, 2 threads), while accumulating into a
    zeroed output with ``addmm_`` does not; elsewhere the plain product.
    """
    if grad_h.device.type != "cpu":
        return grad_h @ a
    return grad_h.new_zeros(grad_h.shape[0], a.shape[1]).addmm_(grad_h, a)


class LowRankUpdate(torch.autograd.Function):
    """``y + s · (dropout(x) Aᵀ) Bᵀ`` for 2-D ``x`` (tokens × fan-in) and ``y`` (tokens ×
    fan-out), ``p = 0``: no dropout; see the module docstring.

    Its backward picks the GEMM layouts that are fast on CPU, where plain autograd's are
    not: ``grad_h = grad · B`` as a product with ``Bᵀ`` transposed (~2× faster),
    ``grad_B`` as ``(hᵀ grad)ᵀ`` (2.5×) and ``grad_x`` through :func:`outer`. Written with
    ``setup_context`` and a generated vmap rule, so ``torch.func`` transforms (``grad``,
    ``vmap`` for per-sample gradients) work through it as through plain autograd.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, y, a, b, scale: float, p: float):
        if p:
            keep = draw_keep(x.shape, p, x.device)
            factor = RESOLUTION / (RESOLUTION - drop_threshold(p))  # 1 / (1 - rounded p)
            h = (x * keep.view(torch.uint8)) @ a.t()  # the uint8 view multiplies fastest
            h = h * factor  # h = dropout(x) Aᵀ, scaled on the rank-r side
            packed = pack_bits(keep)
        else:
            h = x @ a.t()
            packed = x.new_empty(0, dtype=torch.uint8)
        return torch.addmm(y, h, b.t(), alpha=scale), h, packed

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, _, a, b, scale, p = inputs
        _, h, packed = output
        ctx.mark_non_differentiable(h, packed)
        ctx.save_for_backward(x, packed, a, b, h)
        ctx.scale, ctx.dropped = scale, bool(p)
        ctx.factor = RESOLUTION / (RESOLUTION - drop_threshold(p)) if p else 1.0

    @staticmethod
    def backward(ctx, grad, _h, _packed):
        x, packed, a, b, h = ctx.saved_tensors
        recompute = torch.is_grad_enabled()  # create_graph: h must depend on x and A
        needs_mask = recompute or ctx.needs_input_grad[0] or ctx.needs_input_grad[2]
        keep = None
        if ctx.dropped and needs_mask:
            keep = unpack_bits(packed, x.shape).view(torch.uint8)
        if recompute:
            h = ((x if keep is None else x * keep) @ a.t()) * ctx.factor
        grad_x = grad_a = grad_b = None
        if ctx.needs_input_grad[3]:
            grad_b = (h.t() @ grad).t() * ctx.scale
        # the rank-r gradient of dropout(x) Aᵀ with s and 1/(1-p) folded in
        grad_h = (grad @ b.t().contiguous().t()) * (ctx.scale * ctx.factor)
        if ctx.needs_input_grad[2]:
            grad_a = grad_h.t() @ (x if keep is None else x * keep)
        if ctx.needs_input_grad[0]:
            grad_x = outer(grad_h, a)
            if keep is not None:
                grad_x.mul_(keep)
        return grad_x, grad, grad_a, grad_b, None, None


def low_rank_update(x: torch.Tensor, y: torch.Tensor, a, b, scale: float, p: float = 0.0):
    """``y`` plus the update for ``x`` of any leading shape (flattened to tokens × width)."""
    flat = x.reshape(-1, x.shape[-1]).to(a.dtype)  # one dtype inside (autocast ends at backward)
    out = y.reshape(-1, y.shape[-1]).to(a.dtype)
    out = LowRankUpdate.apply(flat, out, a, b, scale, p)[0]
    return out.view(y.shape).to(y.dtype)
