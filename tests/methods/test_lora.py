"""LoRA: the math per layer type, against an independent reference, and its hyperparameters."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltahooks as dh


def lora_tensors(delta, path):
    state = delta.state_dict()
    return state[f"{path}.lora_A"], state[f"{path}.lora_B"]


def reference(module: nn.Module, x, a, b, scale):
    """y + s·B(A x) written out from the paper, independent of the hook code."""
    base = module(x)
    if isinstance(module, nn.Linear):
        return base + scale * (x @ a.T @ b.T)
    if isinstance(module, nn.Embedding):
        return base + scale * (a.T[x] @ b.T)
    conv = {1: F.conv1d, 2: F.conv2d}[a.dim() - 2]
    h = conv(x, a, stride=module.stride, padding=module.padding, dilation=module.dilation)
    return base + scale * conv(h, b)


LAYERS = [
    (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    (lambda: nn.Embedding(11, 5, padding_idx=0), lambda: torch.randint(0, 11, (3, 4))),
    (lambda: nn.Conv1d(3, 4, 3, padding=1, stride=2), lambda: torch.randn(2, 3, 9)),
    (lambda: nn.Conv2d(3, 4, (3, 2), padding=1, dilation=(1, 2)), lambda: torch.randn(2, 3, 7, 8)),
]


@pytest.mark.parametrize("make_layer, make_input", LAYERS)
@pytest.mark.parametrize("rslora", [False, True])
def test_output_matches_reference_and_merge(make_layer, make_input, rslora):
    torch.manual_seed(0)
    model = nn.Sequential(make_layer())
    x = make_input()
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=3, alpha=6, rslora=rslora, init="random"))
    scale = 6 / math.sqrt(3) if rslora else 6 / 3
    a, b = lora_tensors(delta, "0")
    with torch.no_grad():
        got = model(x)
        with delta.disabled():
            want = reference(model[0], x, a, b, scale)
        torch.testing.assert_close(got, want)
        model.eval()
        delta.merge()
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_gpt2_conv1d_matches_linear_and_merges():
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv = Conv1D(5, 6)  # nf=5 outputs, nx=6 inputs, weight (6, 5)
    model = nn.Sequential(conv)
    x = torch.randn(2, 3, 6)
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=2, alpha=4, init="random"))
    a, b = lora_tensors(delta, "0")
    assert a.shape == (2, 6) and b.shape == (5, 2)
    with torch.no_grad():
        with delta.disabled():
            want = conv(x) + 2 * (x @ a.T @ b.T)
        torch.testing.assert_close(model(x), want)
        model.eval()
        delta.merge()
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)


def test_only_delta_parameters_get_gradients():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    delta = dh.attach(model, dh.LoRA(targets=nn.Linear, r=2))
    model(torch.randn(5, 4)).sum().backward()
    grads = {n: p.grad is not None for n, p in model.named_parameters()}
    assert grads == {n: "dh__" in n for n in grads}
    # B starts at zero, so A gets no gradient signal yet but B does
    assert model[0].dh__default__lora_B.grad.abs().sum() > 0
    assert [n for n, _ in delta.named_parameters()] == [
        "0.lora_A",
        "0.lora_B",
        "2.lora_A",
        "2.lora_B",
    ]


def test_rank_and_alpha_patterns():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    spec = dh.LoRA(targets=nn.Linear, r=4, alpha=8, rank_pattern={"1": 2}, alpha_pattern={"1": 1})
    spec = dataclasses.replace(spec, init="random")
    delta = dh.attach(model, spec, freeze_base=False)
    state = delta.state_dict()
    assert state["0.lora_A"].shape == (4, 4)
    assert state["1.lora_A"].shape == (2, 4)
    x = torch.randn(3, 4)
    for index, scale in [("0", 8 / 4), ("1", 1 / 2)]:  # alpha / r, per layer
        layer = model.get_submodule(index)
        with delta.disabled():
            base = layer(x)
        update = x @ state[f"{index}.lora_A"].T @ state[f"{index}.lora_B"].T
        torch.testing.assert_close(layer(x), base + scale * update)


def test_dropout_only_in_training_and_only_on_the_delta_input():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8))
    x = torch.randn(64, 8)
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=4, dropout=0.5, init="random"))
    model.eval()
    with torch.no_grad():
        evaluated = model(x)
        model.train()
        trained = model(x)
        with delta.disabled():
            base = model(x)
    assert not torch.equal(evaluated, trained)
    a, b = lora_tensors(delta, "0")
    torch.testing.assert_close(evaluated, base + 2.0 * (x @ a.T @ b.T))  # alpha 8 / r 4


def test_parameters_follow_device_and_dtype_of_their_module():
    model = nn.Sequential(nn.Linear(4, 4).to(torch.float64), nn.Linear(4, 4).to(torch.bfloat16))
    delta = dh.attach(model, dh.LoRA(targets=nn.Linear))
    dtypes = {n: p.dtype for n, p in delta.named_parameters()}
    assert dtypes["0.lora_A"] == torch.float64 and dtypes["1.lora_B"] == torch.bfloat16
    model.to(torch.float32)
    assert all(p.dtype == torch.float32 for p in delta.parameters())


def test_meta_device_attach_creates_meta_parameters():
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    delta = dh.attach(model, dh.LoRA(targets=nn.Linear, r=16))
    assert all(p.device.type == "meta" for p in delta.parameters())
    delta.detach()
    assert list(model.state_dict()) == ["0.weight", "0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "positive integer"),
        ({"r": 2.5}, "positive integer"),
        ({"alpha": -1}, ">= 0"),
        ({"dropout": 1.0}, r"\[0, 1\)"),
        ({"dropout": -0.1}, r"\[0, 1\)"),
        ({"init": "xavier"}, "unknown"),
        ({"rank_pattern": {"q": 0}}, "positive integer"),
        ({"targets": []}, "targets is empty"),
    ],
)
def test_invalid_hyperparameters(kwargs, message):
    with pytest.raises(dh.SpecError, match=message):
        dh.LoRA(**{"targets": ["q"], **kwargs})


def test_unsupported_module_types_are_refused_and_nothing_changes():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(4, 4, 3, groups=2))
    with pytest.raises(dh.UnsupportedModuleError, match="LayerNorm"):
        dh.attach(model, dh.LoRA(targets=["0", "1"]))
    with pytest.raises(dh.UnsupportedModuleError, match="groups=2"):
        dh.attach(model, dh.LoRA(targets=["2"]))
    assert not model[0]._forward_hooks and list(model.state_dict())[:2] == ["0.weight", "0.bias"]
    assert all(p.requires_grad for p in model.parameters())


def test_keyword_input_reaches_the_hook():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    dh.attach(model, dh.LoRA(targets=["0"], r=2, init="random"))
    x = torch.randn(2, 4)
    with torch.no_grad():
        assert torch.equal(model[0](input=x), model[0](x))


def test_an_earlier_hook_keeps_the_output_it_saw():
    """The in-place fast path is only taken when no other hook has seen the output."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=2, init="random"))
    seen = []
    # prepend: this hook runs before the LoRA hook and keeps a reference to the base output
    handle = model[0].register_forward_hook(
        lambda m, a, out: seen.append(out.clone()) or seen.append(out), prepend=True
    )
    x = torch.randn(2, 4)
    with torch.no_grad():
        y = model(x)
        with delta.disabled():
            base = model(x)
    copy_at_hook_time, kept = seen[0], seen[1]
    assert torch.equal(kept, copy_at_hook_time) and torch.equal(kept, base)
    assert not torch.equal(y, base)
    handle.remove()


def test_in_place_accumulation_trains_like_the_out_of_place_path():
    torch.manual_seed(0)
    fast = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 2))
    slow = copy.deepcopy(fast)
    x = torch.randn(5, 4)
    grads = []
    for model in (fast, slow):
        torch.manual_seed(1)
        delta = dh.attach(model, dh.LoRA(targets=nn.Linear, r=2, init="random"))
        if model is slow:  # a no-op hook that runs first forces the out-of-place path
            for layer in (slow[0], slow[2]):
                layer.register_forward_hook(lambda m, a, out: None, prepend=True)
        model(x).pow(2).sum().backward()
        grads.append({n: p.grad.clone() for n, p in delta.named_parameters()})
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name])
