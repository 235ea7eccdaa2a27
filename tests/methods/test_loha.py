"""LoHa: layers read ``W + s · (A₁B₁) ⊙ (A₂B₂)`` through a weight site, equal to PEFT's LoHa."""

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
from deltahooks.methods.loha import HadamardUpdate

transformers = pytest.importorskip("transformers")

from method_nets import LoHaNet as Net  # noqa: E402
from method_nets import loha_net as make_net  # noqa: E402
from method_table import LOHA  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# LoHa's rows in tests/method_table.py
NET_SPEC = LOHA["loha-net"]


def _factors(delta, path):
    tensors = delta.state_dict()
    return [tensors[f"{path}.hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b")]


def test_the_formula_per_layer_kind():
    model, inputs = seeded(make_net)
    delta = dh.attach(model, NET_SPEC)
    perturb(delta)
    s = 3.0 / 2

    def update(path, layer):
        a1, b1, a2, b2 = _factors(delta, path)
        return layer.weight + s * ((a1 @ b1) * (a2 @ b2)).view_as(layer.weight)

    m = model
    with torch.no_grad(), delta.disabled():
        h = F.conv2d(inputs["pixels"], update("conv", m.conv), m.conv.bias, padding=1)
        h = F.conv2d(torch.relu(h), update("grouped", m.grouped), m.grouped.bias, groups=2)
        h = F.conv1d(torch.relu(h).flatten(2), update("seq", m.seq), m.seq.bias)
        want = F.linear(h.mean(2), update("head", m.head), m.head.bias)
    torch.testing.assert_close(evaluate(model, inputs), want)
    assert tuple(delta.state_dict()["grouped.hada_w1_b"].shape) == (2, 3)  # in / groups


def test_gpt2_conv1d_equals_peft_loha_on_the_equivalent_linear():
    """PEFT's LoHa refuses GPT-2's Conv1D; ours takes it, with the layouts PEFT uses for the
    same layer as an ``nn.Linear`` (fan-out × r, r × fan-in)."""
    peft = pytest.importorskip("peft")
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    conv1d = Conv1D(5, 6)  # 6 → 5, weight stored 6 × 5
    linear = nn.Linear(6, 5)
    with torch.no_grad():
        linear.weight.copy_(conv1d.weight.t())
        linear.bias.copy_(conv1d.bias)
    config = peft.LoHaConfig(target_modules=["0"], r=2, alpha=5, init_weights=False)
    theirs = peft.get_peft_model(nn.Sequential(linear), config)
    ours = nn.Sequential(conv1d).eval()
    delta = dh.attach(ours, dh.LoHa(targets=["0"], r=2, alpha=5))
    with torch.no_grad():
        for name in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
            value = getattr(theirs.base_model.model[0], name)["default"]
            getattr(ours[0], f"dh__default__{name}").copy_(value)
    x = torch.randn(3, 4, 6)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)
        delta.merge()
        torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=1e-5)


def test_custom_backward_equals_autograd_of_the_formula():
    torch.manual_seed(0)
    weight = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    factors = [
        torch.randn(shape, dtype=torch.float64, requires_grad=True)
        for shape in ((5, 3), (3, 7), (5, 3), (3, 7))
    ]
    assert torch.autograd.gradcheck(lambda *t: HadamardUpdate.apply(*t, 0.7), (weight, *factors))


def test_the_forward_keeps_only_the_factors_and_the_weight_it_needs():
    """No full-size product is saved for the backward: only W' (for F.linear) and x."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64))
    delta = dh.attach(model, dh.LoHa(targets=["0"], r=2, init="random"))
    x = torch.randn(3, 64)
    saved = []

    def pack(tensor):
        saved.append(tensor.numel())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        model(x).sum().backward()
    factors = sum(p.numel() for p in delta.parameters())
    assert sum(saved) <= 64 * 64 + x.numel() + factors, saved


def test_base_keys_parameters_and_a_base_checkpoint_while_attached():
    model, inputs = seeded(MODELS["llama"])
    checkpoint = copy.deepcopy(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    delta = dh.attach(model, LOHA["llama"])
    perturb(delta)
    assert [k for k in model.state_dict() if "dh__" not in k] == list(checkpoint)
    assert [n for n, _ in model.named_parameters() if "dh__" not in n] == names
    model.load_state_dict(checkpoint, strict=True)
    tuned = evaluate(model, inputs)
    with delta.disabled():
        assert not torch.equal(evaluate(model, inputs), tuned)


def test_random_init_changes_outputs_and_meta_plans_build_shapes_only():
    model, inputs = seeded(make_net)
    base = evaluate(model, inputs)
    delta = dh.attach(model, dh.LoHa(targets=["head"], init="random"))
    assert not torch.equal(evaluate(model, inputs), base)
    delta.detach()
    with torch.device("meta"):
        meta = Net()
    delta = dh.attach(meta, NET_SPEC)
    assert all(p.is_meta for p in delta.parameters())


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_parity_on_tiny_transformers(name, tmp_path):
    peft = pytest.importorskip("peft")
    if name == "llama":
        targets = ["q_proj", "v_proj", "down_proj"]
        extra = {"rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 6}}
    else:  # PEFT's LoHa refuses GPT-2's Conv1D layers; lm_head is its one Linear
        targets, extra = ["lm_head"], {}
    config = peft.LoHaConfig(target_modules=targets, r=4, alpha=3, init_weights=False, **extra)
    delta = check_peft_parity(MODELS[name], config, tmp_path)
    if name == "llama":
        assert delta.state_dict()["model.layers.0.self_attn.v_proj.hada_w1_b"].shape[0] == 2


def test_peft_parity_on_conv2d(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoHaConfig(target_modules=["conv", "grouped", "head"], r=2, init_weights=False)
    check_peft_parity(make_net, config, tmp_path)


def test_peft_effective_conv_and_incomplete_files_are_refused(tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file, save_file

    base, _ = seeded(make_net)
    config = peft.LoHaConfig(target_modules=["conv"], use_effective_conv2d=True)
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "cp")
    check = copy.deepcopy(base)
    with pytest.raises(dh.UnsupportedOperationError, match="use_effective_conv2d"):
        dh.load_peft(check, tmp_path / "cp")
    config = peft.LoHaConfig(target_modules=["head"])
    peft.get_peft_model(copy.deepcopy(base), config).save_pretrained(tmp_path / "cut")
    weights = tmp_path / "cut" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(weights).items() if "w2_b" not in k}, weights)
    with pytest.raises(dh.DeltaFileError, match="without all four factors"):
        dh.load_peft(check, tmp_path / "cut")
    assert dh.deltas(check) == {}


def test_bad_inputs_leave_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="r=0 must be a positive integer"):
        dh.LoHa(targets=["head"], r=0)
    with pytest.raises(dh.SpecError, match="init='zeros' is unknown"):
        dh.LoHa(targets=["head"], init="zeros")
    with pytest.raises(dh.SpecError, match="alpha=-1 must be a finite number >= 0"):
        dh.LoHa(targets=["head"], alpha=-1)
    model, _ = seeded(make_net)
    model.add_module("emb", nn.Embedding(4, 3))
    model.add_module("volume", nn.Conv3d(2, 2, 1))
    check_refused(model, dh.LoHa(targets=["head", "emb"]), dh.UnsupportedModuleError, "Embedding")
    check_refused(model, dh.LoHa(targets=["volume"]), dh.UnsupportedModuleError, "Conv3d")


def test_the_update_has_right_second_derivatives_and_works_under_torch_func():
    """Its own backward is differentiated again (``create_graph``) and ``torch.func.grad``
    goes through it (``setup_context``), both giving plain autograd's numbers."""
    torch.manual_seed(0)
    shapes = [(4, 5), (4, 2), (2, 5), (4, 2), (2, 5)]
    inputs = [torch.randn(*s, dtype=torch.float64, requires_grad=True) for s in shapes]

    def update(*tensors):
        return HadamardUpdate.apply(*tensors, 0.7)

    assert torch.autograd.gradgradcheck(update, inputs)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    dh.attach(model, dh.LoHa(targets=["0"], r=2))
    x = torch.randn(3, 16)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p):
        return torch.func.functional_call(model, p, (x,)).pow(2).mean()

    grads = torch.func.grad(loss)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    loss(leaves).backward()
    for key, leaf in leaves.items():
        torch.testing.assert_close(grads[key], leaf.grad)
