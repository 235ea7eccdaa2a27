"""LoRA's own autograd path with dropout: PEFT's numbers, a mask instead of a copy."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deltahooks.methods._lora_autograd import dropped_low_rank


def reference(x, a, b, scale, p):
    return F.linear(F.linear(F.dropout(x, p, True), a), b) * scale


def test_same_values_and_gradients_as_plain_autograd_for_the_same_mask():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 16, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, 16, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    outputs, grads = [], []
    for fn in (dropped_low_rank, reference):
        torch.manual_seed(7)  # the same dropout mask on both sides
        out = fn(x, a, b, 0.5, 0.3)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        grads.append(torch.autograd.grad(out, (x, a, b), upstream))
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert outputs[0].abs().sum() > 0 and (grads[0][0] == 0).any()  # the mask dropped some


def test_backward_keeps_the_input_and_a_mask_not_a_dropped_copy():
    torch.manual_seed(0)
    x = torch.randn(64, 32, requires_grad=True)
    a = torch.randn(4, 32, requires_grad=True)
    b = torch.randn(32, 4, requires_grad=True)
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        dropped_low_rank(x, a, b, 1.0, 0.1)
    big = [t for t in saved if t.numel() == x.numel()]
    assert any(t.data_ptr() == x.data_ptr() for t in big)  # x itself, not a copy
    assert sorted(t.dtype for t in big if t.data_ptr() != x.data_ptr()) == [torch.bool]
