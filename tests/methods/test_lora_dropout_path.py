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
    assert [t for t in big if t.data_ptr() != x.data_ptr()] == []  # no dropped copy
    masks = [t for t in saved if t.dtype == torch.uint8]
    assert [t.numel() for t in masks] == [x.numel() // 8]  # the mask, one bit per element


def test_bit_packing_round_trips_any_length():
    from deltahooks.methods._lora_autograd import pack_bits, unpack_bits

    for n in (1, 7, 8, 9, 1000):
        mask = torch.rand(n, generator=torch.Generator().manual_seed(n)) > 0.5
        assert torch.equal(unpack_bits(pack_bits(mask), mask.shape), mask)


def test_a_training_step_with_dropout_equals_peft_for_the_same_seed():
    """The same masks are drawn in the same order as PEFT's, so loss and gradients agree."""
    import copy

    import pytest

    peft = pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from tiny_models import llama

    import deltahooks as dh

    targets = ["q_proj", "v_proj", "down_proj"]
    torch.manual_seed(0)
    base, inputs = llama()
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    delta = dh.attach(ours, dh.LoRA(targets=targets, r=4, dropout=0.3, init="random"))
    config = peft.LoraConfig(target_modules=targets, r=4, lora_alpha=8, lora_dropout=0.3)
    wrapped = peft.get_peft_model(theirs, config)
    state = delta.state_dict()
    names = {}
    with torch.no_grad():
        for name, param in wrapped.named_parameters():
            if "lora_" in name:
                key = name.removeprefix("base_model.model.").removesuffix(".default.weight")
                param.copy_(state[key])
                names[key] = param
    ours.train()
    wrapped.train()
    losses = []
    for model in (ours, wrapped):
        torch.manual_seed(5)
        loss = model(**inputs, labels=inputs["input_ids"]).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=0, atol=1e-6)
    for key, param in delta.named_parameters():
        torch.testing.assert_close(param.grad, names[key].grad, rtol=1e-5, atol=1e-7)
