"""DoRA (``dh.LoRA(..., dora=True)``): the paper's formula per layer kind, PEFT parity
(outputs and training), merge, and the bar every method meets."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from method_bar import (
    check_refused,
    evaluate,
    loss,
    perturb,
    seeded,
)
from model_checks import assert_outputs_equal, assert_restored, snapshot
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from tiny_models import gpt2, llama  # noqa: E402  (after the importorskip)

SPECS = {
    "gpt2": dh.LoRA(targets=["c_attn", "mlp.c_fc", "wte"], r=2, alpha=4, dora=True),
    "llama": dh.LoRA(targets=["q_proj", "v_proj", "down_proj"], r=2, alpha=4, dora=True),
}
MAKE = {"gpt2": gpt2, "llama": llama}
# the bar (training, files, detach from init="random", merge, checkpointing, compile) runs
# for DoRA's rows in tests/method_table.py


def rows(module: nn.Module, weight: torch.Tensor) -> torch.Tensor:
    """The weight as out × in, written out per layer type (independent of layers.py)."""
    from transformers.pytorch_utils import Conv1D

    if isinstance(module, (nn.Embedding, Conv1D)):
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def reference(module: nn.Module, x, a, b, m, scale):
    """The paper's W' = m (W + sBA) / ‖W + sBA‖ (norm per output channel), then the layer."""
    from transformers.pytorch_utils import Conv1D

    w = rows(module, module.weight).double()
    full = w + scale * (b.double().reshape(b.shape[0], -1) @ a.double().reshape(a.shape[0], -1))
    new = (m.double().reshape(-1, 1) * full / full.norm(dim=1, keepdim=True)).float()
    if isinstance(module, nn.Linear):
        return F.linear(x, new, module.bias)
    if isinstance(module, Conv1D):
        return x @ new.T + module.bias
    if isinstance(module, nn.Embedding):
        return F.embedding(x, new.T, module.padding_idx)
    return module._conv_forward(x, new.reshape(module.weight.shape), module.bias)


def conv1d_gpt2():
    from transformers.pytorch_utils import Conv1D

    return Conv1D(5, 6)


LAYERS = {
    "linear": (lambda: nn.Linear(6, 5), lambda: torch.randn(3, 4, 6)),
    "linear_no_bias": (lambda: nn.Linear(6, 5, bias=False), lambda: torch.randn(3, 6)),
    "gpt2_conv1d": (conv1d_gpt2, lambda: torch.randn(2, 3, 6)),
    "embedding": (lambda: nn.Embedding(11, 5, padding_idx=0), lambda: torch.randint(0, 11, (3, 4))),
    "conv1d": (lambda: nn.Conv1d(3, 4, 3, padding=1, stride=2), lambda: torch.randn(2, 3, 9)),
    "conv2d": (lambda: nn.Conv2d(3, 4, (3, 2), padding=1), lambda: torch.randn(2, 3, 7, 8)),
    "conv2d_unbatched": (lambda: nn.Conv2d(3, 4, 3), lambda: torch.randn(3, 6, 6)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_formula_per_layer_kind_and_merge(layer):
    make_layer, make_input = LAYERS[layer]
    torch.manual_seed(0)
    model = nn.Sequential(make_layer()).eval()
    x = make_input()
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=2, alpha=6, dora=True, init="random"))
    perturb(delta, std=0.3)
    state = delta.state_dict()
    a, b, m = state["0.lora_A"], state["0.lora_B"], state["0.lora_magnitude_vector"]
    out_channels = rows(model[0], model[0].weight).shape[0]
    assert m.numel() == out_channels  # PEFT's shapes: (out,), or (1, out, 1, 1) for a conv
    assert m.dim() == (model[0].weight.dim() if isinstance(model[0], nn.Conv2d | nn.Conv1d) else 1)
    with torch.no_grad():
        want = reference(model[0], x, a, b, m, 3.0)
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        before = snapshot(model)
        delta.merge()
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        delta.unmerge()
    assert_restored(model, before, same_hook_ids=False)


def test_magnitude_starts_at_the_weight_norm_and_outputs_are_unchanged_bit_for_bit():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Embedding(7, 5), nn.Conv2d(3, 4, 3)).eval()
    delta = dh.attach(model, dh.LoRA(targets=["0", "1", "2"], r=2, dora=True))
    state = delta.state_dict()
    torch.testing.assert_close(state["0.lora_magnitude_vector"], model[0].weight.norm(dim=1))
    torch.testing.assert_close(state["1.lora_magnitude_vector"], model[1].weight.norm(dim=0))
    conv_norm = model[2].weight.flatten(1).norm(dim=1).view(1, 4, 1, 1)
    torch.testing.assert_close(state["2.lora_magnitude_vector"], conv_norm)
    x = torch.randn(2, 6)
    with torch.no_grad():
        y = model[0](x)
        with delta.disabled():
            assert torch.equal(model[0](x), y)


def test_the_norm_is_a_constant_in_backward():
    """DoRA §4.3 / PEFT: ‖W + sBA‖ gets no gradient, so A and B see m/‖·‖ as a fixed scale."""
    torch.manual_seed(0)
    layer = nn.Linear(6, 5)
    model = nn.Sequential(layer)
    delta = dh.attach(model, dh.LoRA(targets=["0"], r=2, dora=True, init="random"))
    perturb(delta)
    x = torch.randn(4, 6)
    model(x).pow(2).sum().backward()
    got = {n: p.grad.clone() for n, p in delta.named_parameters()}
    a, b, m = (p.detach().clone().requires_grad_() for p in delta.parameters())
    full = layer.weight + 4.0 * b @ a  # alpha 8 / r 2
    norm = full.norm(dim=1, keepdim=True).detach()
    F.linear(x, m[:, None] * full / norm, layer.bias).pow(2).sum().backward()
    for name, want in zip(["0.lora_A", "0.lora_B", "0.lora_magnitude_vector"], (a, b, m)):
        torch.testing.assert_close(got[name], want.grad)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_identity_at_attach(name):
    model, inputs = seeded(MAKE[name])
    base = evaluate(model, inputs)
    delta = dh.attach(model, SPECS[name])
    with delta.disabled():
        frozen = evaluate(model, inputs)
    assert_outputs_equal(evaluate(model, inputs), frozen)
    torch.testing.assert_close(frozen, base, rtol=1e-6, atol=1e-6)


def test_merge_is_refused_while_another_delta_adds_to_the_layer():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    dora = dh.attach(model, dh.LoRA(targets=["0"], r=2, dora=True, init="random"), name="d")
    dh.attach(model, dh.LoRA(targets=["0"], r=2, init="random"), name="l")
    before = snapshot(model)
    with pytest.raises(dh.DeltaStateError, match="merge or detach 'l' first"):
        dora.merge()
    assert_restored(model, before)


def test_bad_inputs_leave_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="dora='yes' must be True or False"):
        dh.LoRA(targets=["0"], dora="yes")
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4), nn.Conv2d(4, 4, 3, groups=2))
    check_refused(model, dh.LoRA(targets=["0", "1"], dora=True), dh.UnsupportedModuleError, "Norm")
    check_refused(model, dh.LoRA(targets=["2"], dora=True), dh.UnsupportedModuleError, "groups=2")


def test_bfloat16_stays_bfloat16():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    dh.attach(model, dh.LoRA(targets=["0"], r=2, dora=True, init="random"))
    with torch.no_grad():
        assert model(torch.randn(3, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


# ------------------------------------------------------------------------- PEFT parity
PEFT_TARGETS = {
    "gpt2": ["c_attn", "mlp.c_fc", "wte"],
    "llama": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
}


def peft_dora(model, targets, tmp_path, **config):
    """A PEFT DoRA model with random B and a magnitude moved off ‖W + sBA‖, saved."""
    peft = pytest.importorskip("peft")
    options = {"r": 2, "lora_alpha": 4, "init_lora_weights": False, **config}
    theirs = peft.get_peft_model(
        model, peft.LoraConfig(target_modules=targets, use_dora=True, **options)
    )
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in theirs.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(1 + 0.2 * torch.randn(param.shape, generator=generator))
    theirs.save_pretrained(tmp_path / "adapter", save_embedding_layers=False)
    return theirs.eval()


def train(model, inputs, parameters, steps: int = 5) -> list[float]:
    optimizer = torch.optim.Adam(parameters, lr=1e-2)
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        value = loss(model, inputs)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    return losses


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_peft_parity_outputs_and_five_training_steps(name, tmp_path):
    model, inputs = seeded(MAKE[name])
    ours = copy.deepcopy(model)
    theirs = peft_dora(model, PEFT_TARGETS[name], tmp_path)
    delta = dh.load_peft(ours, tmp_path / "adapter")
    assert delta.specs[0].dora and len(delta.paths) == len(
        [k for k in theirs.state_dict() if "lora_magnitude_vector" in k]
    )
    want = evaluate(theirs, inputs)
    torch.testing.assert_close(evaluate(ours, inputs), want, rtol=0, atol=1e-5)
    trainable = [p for p in theirs.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in delta.parameters())
    losses = train(theirs, inputs, trainable), train(ours, inputs, list(delta.parameters()))
    assert losses[0][-1] < losses[0][0]
    torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=1e-5)
    torch.testing.assert_close(evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-4)
    if name == "llama":  # GPT-2's wte is tied to lm_head; ours refuses to merge into it
        delta.merge()
        theirs.merge_adapter()
        torch.testing.assert_close(
            evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-4
        )


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x):
        return self.head(torch.relu(self.conv(x)).mean(dim=(-2, -1)))


def test_peft_parity_on_conv2d_with_dropout_in_training(tmp_path):
    """Conv2d and Linear; with dropout, PEFT recomputes Wx from the dropped input, as ours."""
    torch.manual_seed(0)
    model = ConvNet().eval()
    ours = copy.deepcopy(model)
    theirs = peft_dora(model, ["conv", "head"], tmp_path, lora_dropout=0.3)
    delta = dh.load_peft(ours, tmp_path / "adapter")
    x = torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
    theirs.train()
    ours.train()
    grads = []
    for side, params in (
        (theirs, [p for p in theirs.parameters() if p.requires_grad]),
        (ours, list(delta.parameters())),
    ):
        torch.manual_seed(5)  # the same dropout masks
        side(x).pow(2).sum().backward()
        grads.append(sorted(p.grad.abs().sum().item() for p in params))
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-6)


def test_peft_import_refuses_a_dora_file_without_magnitudes(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    model, _ = seeded(llama)
    peft_dora(copy.deepcopy(model), ["q_proj"], tmp_path)
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k: v for k, v in tensors.items() if "magnitude" not in k}, weights)
    before = snapshot(model)
    with pytest.raises(dh.DeltaFileError, match="magnitude"):
        dh.load_peft(model, tmp_path / "adapter")
    assert_restored(model, before)
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["use_dora"]
