"""LoKr: layers read ``W + s · (W₁ ⊗ W₂)`` through a weight site, equal to PEFT's LoKr."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from lycoris_parity import check_peft_parity
from method_bar import (
    check_refused,
    evaluate,
    perturb,
    seeded,
)
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from method_nets import lokr_net as make_net  # noqa: E402
from method_table import LOKR  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# LoKr's rows in tests/method_table.py
NET_SPEC = LOKR["lokr-net"]


def test_the_formula_per_layer_kind_with_torch_kron():
    model, inputs = seeded(make_net)
    delta = dh.attach(model, NET_SPEC)
    perturb(delta)
    state = delta.state_dict()
    # factor=2 splits every width as 2 × rest; r=1 keeps W₁ full, W₂ low-rank where
    # r < max(out₂, in₂) / 2
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        "conv.lokr_w1": (2, 1),  # in 3 is not divisible by 2: (1, 3)
        "conv.lokr_w2_a": (4, 1),
        "conv.lokr_w2_b": (1, 27),  # in₂ · kernel
        "grouped.lokr_w1": (2, 2),  # in / groups = 4 → (2, 2); out 4 → (2, 2)
        "grouped.lokr_w2": (2, 2, 1, 1),  # r >= max(2, 2) / 2: full
        "head.lokr_w1": (2, 2),
        "head.lokr_w2_a": (6, 1),
        "head.lokr_w2_b": (1, 2),
    }
    s = 3.0 / 1

    def update(path, layer):
        w1 = state[f"{path}.lokr_w1"]
        w2 = state.get(f"{path}.lokr_w2")
        if w2 is None:
            w2 = state[f"{path}.lokr_w2_a"] @ state[f"{path}.lokr_w2_b"]
        if layer.weight.dim() == 4 and w2.dim() == 2:
            w2 = w2.view(w2.shape[0], -1, *layer.weight.shape[2:])
        if layer.weight.dim() == 4:
            w1 = w1[:, :, None, None]
        return layer.weight + s * torch.kron(w1, w2)

    m = model
    with torch.no_grad(), delta.disabled():
        h = F.conv2d(inputs["pixels"], update("conv", m.conv), m.conv.bias, padding=1)
        h = F.conv2d(torch.relu(h), update("grouped", m.grouped), m.grouped.bias, groups=2)
        want = F.linear(torch.relu(h).mean((2, 3)), update("head", m.head), m.head.bias)
    torch.testing.assert_close(evaluate(model, inputs), want)


def test_gpt2_conv1d_equals_peft_lokr_on_the_equivalent_linear():
    """PEFT's LoKr refuses GPT-2's Conv1D; ours takes it, with PEFT's layouts for the same
    layer as an ``nn.Linear``."""
    peft = pytest.importorskip("peft")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv1d = Conv1D(12, 8)  # 8 → 12, weight stored 8 × 12
    linear = nn.Linear(8, 12)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        linear.bias.copy_(conv1d.bias)
    config = peft.LoKrConfig(target_modules=["0"], r=1, alpha=5, init_weights=False)
    theirs = peft.get_peft_model(nn.Sequential(linear), config)
    ours = nn.Sequential(conv1d).eval()
    delta = dh.attach(ours, dh.LoKr(targets=["0"], r=1, alpha=5))
    with torch.no_grad():
        for key in delta.state_dict():
            name = key.split(".", 1)[1]
            getattr(ours[0], f"dh__default__{name}").copy_(
                getattr(theirs.base_model.model[0], name)["default"]
            )
    x = torch.randn(3, 4, 8)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
        delta.merge()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_the_forward_keeps_no_full_size_kronecker_product():
    """Only W' (for F.linear), x and the small factors are saved for the backward."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    dh.attach(model, dh.LoKr(targets=["0"], r=2, decompose_both=True, init="random"))
    x = torch.randn(3, 64)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum().backward()
    assert sum(saved) <= 64 * 64 + x.numel() + 4 * 64, saved


@pytest.mark.parametrize("init", ["default", "lycoris"])
def test_both_identity_inits_leave_the_outputs_and_random_changes_them(init):
    model, inputs = seeded(make_net)
    base = evaluate(model, inputs)
    delta = dh.attach(model, dh.LoKr(targets=["head", "conv"], init=init))
    torch.testing.assert_close(evaluate(model, inputs), base, rtol=0, atol=1e-6)
    delta.detach()
    dh.attach(model, dh.LoKr(targets=["head"], init="random"))
    assert not torch.allclose(evaluate(model, inputs), base)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_parity_on_tiny_transformers(name, tmp_path):
    peft = pytest.importorskip("peft")
    if name == "llama":  # full, low-rank and decomposed-both factors, a split factor
        targets = ["q_proj", "v_proj", "down_proj", "up_proj"]
        extra = {
            "rank_pattern": {"down_proj": 1},
            "alpha_pattern": {"v_proj": 6},
            "decompose_both": True,
            "decompose_factor": 4,
        }
    else:  # PEFT's LoKr refuses GPT-2's Conv1D layers; lm_head is its one Linear
        targets, extra = ["lm_head"], {}
    config = peft.LoKrConfig(target_modules=targets, r=4, alpha=3, init_weights=False, **extra)
    check_peft_parity(MODELS[name], config, tmp_path)


def test_peft_parity_on_conv2d(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoKrConfig(
        target_modules=["conv", "grouped", "head"], r=1, alpha=0.25, init_weights=False
    )
    check_peft_parity(make_net, config, tmp_path)


def test_peft_effective_conv_and_incomplete_files_are_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    base, _ = seeded(make_net)
    config = peft.LoKrConfig(target_modules=["conv"], r=1, use_effective_conv2d=True)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "cp")
    check = copy.deepcopy(base)
    with pytest.raises(dh.UnsupportedOperationError, match="use_effective_conv2d"):
        dh.load_peft(check, tmp_path / "cp")
    config = peft.LoKrConfig(target_modules=["head"], r=1)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "w2_b" not in k}, weights)
    with pytest.raises(dh.DeltaFileError, match="without both of their factors"):
        dh.load_peft(check, tmp_path / "cut")
    assert dh.deltas(check) == {}


def test_bad_inputs_leave_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="factor=0 must be -1"):
        dh.LoKr(targets=["head"], factor=0)
    with pytest.raises(dh.SpecError, match="factor=True must be -1"):
        dh.LoKr(targets=["head"], factor=True)
    with pytest.raises(dh.SpecError, match="decompose_both='yes' must be True or False"):
        dh.LoKr(targets=["head"], decompose_both="yes")
    with pytest.raises(dh.SpecError, match="r=0 must be a positive integer"):
        dh.LoKr(targets=["head"], r=0)
    model, _ = seeded(make_net)
    model.add_module("seq", nn.Conv1d(2, 2, 3))
    model.add_module("norm", nn.LayerNorm(4))
    check_refused(model, dh.LoKr(targets=["head", "seq"]), dh.UnsupportedModuleError, "Conv1d")
    check_refused(model, dh.LoKr(targets=["norm"]), dh.UnsupportedModuleError, "LayerNorm")
