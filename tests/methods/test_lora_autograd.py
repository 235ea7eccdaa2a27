"""LoRA's own autograd path in training: plain autograd's numbers, a mask instead of a copy."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from deltahooks.methods._lora_autograd import (
    RESOLUTION,
    draw_keep,
    drop_threshold,
    low_rank_update,
    outer,
)


def reference(x, y, a, b, scale, p):
    """Plain autograd with the mask the path draws for the same seed."""
    keep = draw_keep(x.shape, p, x.device)
    factor = 1 / (1 - drop_threshold(p) / RESOLUTION)
    return y + F.linear(F.linear(x * keep * factor, a), b) * scale


@pytest.mark.parametrize("p", [0.0, 0.3])
@pytest.mark.parametrize("fan_in", [16, 1100])  # 1100: wide enough for outer()'s CPU path
def test_same_values_and_gradients_as_plain_autograd_for_the_same_mask(p, fan_in):
    torch.manual_seed(0)
    x = torch.randn(3, 5, fan_in, dtype=torch.float64, requires_grad=True)
    a = torch.randn(4, fan_in, dtype=torch.float64, requires_grad=True)
    b = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randn(3, 5, 8, dtype=torch.float64, requires_grad=True)
    outputs, grads = [], []
    for fn in (low_rank_update, reference):
        torch.manual_seed(7)  # the same dropout mask on both sides
        out = fn(x, y, a, b, 0.5, p)
        upstream = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
        grads.append(torch.autograd.grad(out, (x, y, a, b), upstream))
        outputs.append(out)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(*grads):
        torch.testing.assert_close(ours, theirs, rtol=1e-12, atol=1e-12)
    assert outputs[0].abs().sum() > 0
    assert (grads[0][0] == 0).any() == (p > 0)  # the mask dropped some, or none


def test_outer_is_the_matrix_product():
    torch.manual_seed(0)
    for width in (7, 512, 1376):
        grad_h, a = torch.randn(33, 8), torch.randn(8, width)
        torch.testing.assert_close(outer(grad_h, a), grad_h @ a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_the_mask_drops_each_element_with_probability_p(p):
    """Dropout's law: P(drop) = p (to 2⁻¹⁶), and the kept values scaled so E[update] holds."""
    torch.manual_seed(0)
    n = 1 << 20
    keep = draw_keep(torch.Size([n]), p, torch.device("cpu"))
    dropped = n - int(keep.sum())
    assert abs(drop_threshold(p) / RESOLUTION - p) <= 0.5 / RESOLUTION
    sigma = (n * p * (1 - p)) ** 0.5
    assert abs(dropped - n * p) < 6 * sigma, (dropped, n * p)
    # elements are independent of their neighbours (the four draws of one 64-bit word)
    pairs = keep.view(-1, 4)
    both = int((~pairs[:, 0] & ~pairs[:, 1]).sum())
    expected = (n // 4) * p * p
    assert abs(both - expected) < 6 * (expected * (1 - p * p)) ** 0.5 + 1


def test_the_mask_follows_the_seed():
    masks = []
    for _ in range(2):
        torch.manual_seed(3)
        masks.append(draw_keep(torch.Size([7, 9]), 0.3, torch.device("cpu")))
    assert torch.equal(*masks)
    assert not torch.equal(masks[0], draw_keep(torch.Size([7, 9]), 0.3, torch.device("cpu")))


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
        low_rank_update(x, torch.zeros(64, 32, requires_grad=True), a, b, 1.0, 0.1)
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


class DrawnDropout(torch.nn.Module):
    """Dropout with the masks our path draws: swapped into PEFT's layers below."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x):
        keep = draw_keep(x.shape, self.p, x.device)
        return x * keep / (1 - drop_threshold(self.p) / RESOLUTION)


def test_a_training_step_with_dropout_equals_peft_given_the_same_masks():
    """Masks are drawn in the order PEFT's are; with PEFT's dropout modules drawing ours
    (``DrawnDropout``), loss and gradients agree, so only the masks' generator differs."""
    import copy

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
    for module in wrapped.modules():
        if isinstance(getattr(module, "lora_dropout", None), torch.nn.ModuleDict):
            module.lora_dropout["default"] = DrawnDropout(0.3)
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


# Checkpointing with dropout replays the first pass's masks: the lora-llama-dropout rows of
# tests/method_table.py.


@settings(max_examples=60, deadline=None)
@given(
    tokens=st.integers(1, 40),
    fan_in=st.integers(1, 70),
    fan_out=st.integers(1, 20),
    rank=st.integers(1, 6),
    p=st.sampled_from([0.0, 0.01, 0.3, 0.9]),
    seed=st.integers(0, 2**16),
)
def test_any_shape_equals_plain_autograd_for_the_same_mask(tokens, fan_in, fan_out, rank, p, seed):
    """Any token count and width (element counts that are no multiple of 8 included, which
    pad the packed mask), any rank and probability: values and all four gradients."""
    generator = torch.Generator().manual_seed(seed)

    def leaf(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).requires_grad_()

    x, y = leaf(tokens, fan_in), leaf(tokens, fan_out)
    a, b = leaf(rank, fan_in), leaf(fan_out, rank)
    upstream = torch.randn(tokens, fan_out, generator=generator, dtype=torch.float64)
    results = []
    for fn in (low_rank_update, reference):
        torch.manual_seed(seed)
        out = fn(x, y, a, b, 0.7, p)
        results.append((out, *torch.autograd.grad(out, (x, y, a, b), upstream)))
    for ours, theirs in zip(*results):
        torch.testing.assert_close(ours, theirs, rtol=1e-10, atol=1e-10)


def lora_mlp():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    return model, torch.randn(6, 64)


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_torch_func_grad_goes_through_the_path(dropout, monkeypatch):
    """``torch.func.grad`` over ``functional_call`` gives what ``backward`` gives."""
    import deltahooks as dh
    from deltahooks.methods import _lora_autograd

    monkeypatch.setattr(_lora_autograd, "FAST_BACKWARD_MIN", 0)  # the path, however small
    model, x = lora_mlp()
    dh.attach(model, dh.LoRA(targets=["0"], r=4, dropout=dropout, init="random"))
    model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).pow(2).mean()

    torch.manual_seed(3)  # the same dropout masks in both
    grads = torch.func.grad(loss)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch.manual_seed(3)
    loss(leaves).backward()
    for key, leaf in leaves.items():
        torch.testing.assert_close(grads[key], leaf.grad, rtol=1e-6, atol=1e-7)


def test_per_sample_gradients_with_vmap(monkeypatch):
    """``vmap(grad(...))`` (per-sample gradients, as in DP training) equals a loop."""
    import deltahooks as dh
    from deltahooks.methods import _lora_autograd

    monkeypatch.setattr(_lora_autograd, "FAST_BACKWARD_MIN", 0)
    model, x = lora_mlp()
    dh.attach(model, dh.LoRA(targets=["0"], r=4, init="random"))
    model.train()
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, row):
        return torch.func.functional_call(model, p, (row.unsqueeze(0),)).pow(2).mean()

    per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
        loss(leaves, x[i]).backward()
        for key, leaf in leaves.items():
            torch.testing.assert_close(per_sample[key][i], leaf.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("p", [0.0, 0.4])
def test_second_derivatives_are_right(p):
    """``create_graph=True`` (gradient penalties, second-order meta-learning) differentiates
    the backward too: ``gradgradcheck`` with a fixed mask."""
    torch.manual_seed(0)
    inputs = [
        torch.randn(*shape, dtype=torch.float64, requires_grad=True)
        for shape in [(5, 7), (5, 3), (2, 7), (3, 2)]
    ]

    def update(x, y, a, b):
        torch.manual_seed(11)  # the same mask on every call
        return low_rank_update(x, y, a, b, 0.5, p)

    assert torch.autograd.gradcheck(update, inputs)
    assert torch.autograd.gradgradcheck(update, inputs)
