"""LoRA on parameters: a target naming a 2-D weight or a 3-D expert stack adapts it through a
weight site (``W + s·BA`` per expert), equal to PEFT's ``target_parameters`` LoRA."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn.functional as F
from lycoris_parity import check_peft_parity
from method_bar import (
    assert_unmerged,
    check_refused,
    evaluate,
    perturb,
    seeded,
)
from model_checks import assert_outputs_equal, assert_restored, snapshot

import deltahooks as dh
from deltahooks.methods import lora_parameters

transformers = pytest.importorskip("transformers")

from method_nets import Experts  # noqa: E402
from method_nets import experts_net as make_experts  # noqa: E402
from tiny_models import mixtral  # noqa: E402  (after the importorskip)

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
SPEC = dh.LoRA(targets=EXPERTS, r=4, alpha=8, rank_pattern={"layers.1.mlp.experts.down_proj": 2})


PLAIN_SPEC = dh.LoRA(targets=["stack", "gate"], r=2, alpha=3)
# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# these specs from tests/method_table.py


def test_factors_are_per_expert_and_files_record_parameter_paths(tmp_path):
    model, inputs = seeded(mixtral)
    delta = dh.attach(model, SPEC)
    shapes = {key: tuple(t.shape) for key, t in delta.state_dict().items()}
    assert shapes == {
        "model.layers.0.mlp.experts.gate_up_proj.lora_A": (4, 4, 32),  # E × r × in
        "model.layers.0.mlp.experts.gate_up_proj.lora_B": (4, 128, 4),  # E × out × r
        "model.layers.0.mlp.experts.down_proj.lora_A": (4, 4, 64),
        "model.layers.0.mlp.experts.down_proj.lora_B": (4, 32, 4),
        "model.layers.1.mlp.experts.gate_up_proj.lora_A": (4, 4, 32),
        "model.layers.1.mlp.experts.gate_up_proj.lora_B": (4, 128, 4),
        "model.layers.1.mlp.experts.down_proj.lora_A": (4, 2, 64),  # rank_pattern
        "model.layers.1.mlp.experts.down_proj.lora_B": (4, 32, 2),
    }
    assert delta.paths == [key.rpartition(".")[0] for key in shapes][::2]
    perturb(delta)
    delta.save(tmp_path / "moe.safetensors")
    info = dh.io.describe_file(tmp_path / "moe.safetensors")
    assert "model.layers.1.mlp.experts.down_proj" in info
    fresh, _ = seeded(mixtral)
    loaded = dh.load(fresh, tmp_path / "moe.safetensors")
    assert loaded.paths == delta.paths
    assert_outputs_equal(evaluate(fresh, inputs), evaluate(model, inputs))


@pytest.mark.parametrize("transposed", [False, True])
def test_the_formula_on_a_plain_expert_stack(transposed):
    model, inputs = seeded(functools.partial(make_experts, transposed))
    delta = dh.attach(model, PLAIN_SPEC)
    perturb(delta)
    tensors, s = delta.state_dict(), 3 / 2
    a, b = tensors["moe.stack.lora_A"], tensors["moe.stack.lora_B"]  # 3 × 2 × 5, 3 × 6 × 2
    update = s * (b @ a)  # expert e: out × in
    moe = model.moe
    with torch.no_grad(), delta.disabled():
        stack = moe.stack + (update.mT if transposed else update)
        gate = moe.gate + s * tensors["moe.gate.lora_B"] @ tensors["moe.gate.lora_A"]
        x = inputs["x"]
        weights = stack if transposed else stack.mT
        routes = torch.softmax(x @ gate.t(), dim=-1)
        want = moe.norm((routes[..., None] * torch.einsum("ti,eio->teo", x, weights)).sum(1))
    torch.testing.assert_close(evaluate(model, inputs), want)
    assert tuple(a.shape) == (3, 2, 5) and tuple(b.shape) == (3, 6, 2)


@pytest.mark.parametrize("make", [mixtral, make_experts], ids=["mixtral", "plain"])
def test_merge_unmerge_and_detach_exactly(make):
    """(Merge ≈ hooked and an exact unmerge are the table's; here: no parametrization
    is left while merged, and detach from merged restores the original tensors.)"""
    spec = SPEC if make is mixtral else PLAIN_SPEC
    model, inputs = seeded(make)
    before = snapshot(model)
    delta = dh.attach(model, spec)
    perturb(delta)
    hooked, state = evaluate(model, inputs), snapshot(model)
    delta.merge()
    torch.testing.assert_close(evaluate(model, inputs), hooked, rtol=1e-5, atol=1e-5)
    assert not any(getattr(m, "parametrizations", None) for m in model.modules())
    delta.unmerge()
    assert_unmerged(model, state)
    delta.merge()
    delta.detach()  # merged: detach restores the original tensors bit for bit
    assert_restored(model, before)


def test_base_keys_parameters_and_a_base_checkpoint_while_attached():
    model, inputs = seeded(mixtral)
    checkpoint = copy.deepcopy(model.state_dict())
    names = [n for n, _ in model.named_parameters()]
    delta = dh.attach(model, SPEC)
    perturb(delta)
    assert [k for k in model.state_dict() if "dh__" not in k] == list(checkpoint)
    assert [n for n, _ in model.named_parameters() if "dh__" not in n] == names
    assert "model.layers.0.mlp.experts.dh__default__gate_up_proj__lora_A" in model.state_dict()
    model.load_state_dict(checkpoint, strict=True)
    tuned = evaluate(model, inputs)
    with delta.disabled():
        assert not torch.equal(evaluate(model, inputs), tuned)
    copied = copy.deepcopy(model)  # a copy works on its own
    assert_outputs_equal(evaluate(copied, inputs), tuned)
    dh.detach(copied)
    assert_outputs_equal(evaluate(model, inputs), tuned)


@pytest.mark.parametrize("implementation", ["eager", "batched_mm", "grouped_mm"])
def test_every_experts_implementation_computes_the_stack_once_per_call(implementation, monkeypatch):
    """transformers' eager loop reads the stack once per expert: computed once per call."""
    calls = []

    def counted(*args):
        calls.append(1)
        return updated(*args)

    updated = lora_parameters.updated_weight
    monkeypatch.setattr(lora_parameters, "updated_weight", counted)
    outputs = []
    for name in ("grouped_mm", implementation):
        model, inputs = seeded(functools.partial(mixtral, name))
        delta = dh.attach(model, SPEC)
        perturb(delta)
        calls.clear()
        outputs.append(evaluate(model, inputs))
        assert len(calls) == 4, calls  # 2 layers × 2 parameters
    torch.testing.assert_close(outputs[1], outputs[0], rtol=1e-5, atol=1e-6)


def test_loraplus_groups_take_parameter_targets():
    model, _ = seeded(mixtral)
    delta = dh.attach(model, SPEC)
    groups = dh.loraplus_param_groups(delta, lr=1e-3, ratio=4)
    assert [(len(g["params"]), g["lr"]) for g in groups] == [(4, 1e-3), (4, 4e-3)]


# ------------------------------------------------------------------------ PEFT
def test_peft_target_parameters_load_with_equal_outputs_and_training(tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        target_modules=["q_proj"],
        target_parameters=EXPERTS,
        r=4,
        lora_alpha=3,
        rank_pattern={"layers.1.mlp.experts.down_proj": 2},
        alpha_pattern={"gate_up_proj": 5},
        init_lora_weights=False,
    )
    delta = check_peft_parity(mixtral, config, tmp_path)
    assert sorted(p.rpartition(".")[2] for p in delta.paths) == sorted(
        ["q_proj", "gate_up_proj", "down_proj"] * 2
    )


@pytest.mark.parametrize("transposed", [False, True])
def test_peft_parity_on_a_plain_stack_and_a_2d_weight(transposed, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(
        target_modules=[], target_parameters=["stack", "gate"], r=2, init_lora_weights=False
    )
    check_peft_parity(functools.partial(make_experts, transposed), config, tmp_path)


@pytest.mark.parametrize("make", [mixtral, make_experts], ids=["mixtral", "plain"])
def test_save_peft_loads_in_peft_with_equal_outputs_both_ways(make, tmp_path):
    peft = pytest.importorskip("peft")
    spec = SPEC if make is mixtral else PLAIN_SPEC
    base, inputs = seeded(make)
    ours = copy.deepcopy(base)
    delta = dh.attach(ours, spec)
    perturb(delta)
    want = evaluate(ours, inputs)
    delta.save_peft(tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["target_modules"] == []
    assert config["target_parameters"] == delta.paths
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours").eval()
    torch.testing.assert_close(evaluate(theirs, inputs), want, rtol=0, atol=1e-5)
    theirs.save_pretrained(tmp_path / "theirs")  # PEFT → ours: the same tensors come back
    again = copy.deepcopy(base)
    back = dh.load_peft(again, tmp_path / "theirs")
    for key, value in delta.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    assert_outputs_equal(evaluate(again, inputs), want)


# ------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize(
    ("spec", "error", "match"),
    [
        (dh.LoRA(targets=EXPERTS, dropout=0.1), dh.SpecError, "dropout=0.0"),
        (dh.LoRA(targets=EXPERTS, dora=True), dh.SpecError, "dora=True cannot apply"),
        (dh.LoRA(targets=EXPERTS, init="pissa"), dh.SpecError, "init='pissa' cannot apply"),
        (dh.LoRA(targets=["experts.gate_proj"]), dh.TargetError, "experts.gate_up_proj"),
        (dh.LoRA(targets=["input_layernorm.weight"]), dh.UnsupportedModuleError, "1-D"),
        (dh.LoRA(targets=["q_proj.bias"]), dh.TargetError, "matches no module or parameter"),
    ],
    ids=["dropout", "dora", "pissa", "no-such-parameter", "1-d", "absent-bias"],
)
def test_bad_parameter_targets_are_refused_with_the_model_unchanged(spec, error, match):
    model, _ = seeded(mixtral)
    check_refused(model, spec, error, match)


def test_a_missing_parameter_lists_the_nearest_parameter_paths():
    model, _ = seeded(mixtral)
    with pytest.raises(dh.TargetError) as caught:
        dh.attach(model, dh.LoRA(targets=["experts.gate_proj"]))
    message = str(caught.value)
    assert "Closest parameter paths" in message
    assert "model.layers.0.mlp.experts.gate_up_proj" in message
    # module paths first (what a target usually is), then parameter paths
    assert message.index("Closest module paths") < message.index("Closest parameter paths")


def test_a_name_that_matches_a_module_still_targets_the_module():
    model, _ = seeded(mixtral)
    delta = dh.attach(model, dh.LoRA(targets=["q_proj", "o_proj.weight"], r=2))
    assert [p.rpartition(".")[2] for p in delta.paths] == ["q_proj", "weight"] * 2
    keys = list(delta.state_dict())
    assert "model.layers.0.self_attn.q_proj.lora_A" in keys  # a module target (output hook)
    assert "model.layers.0.self_attn.o_proj.weight.lora_A" in keys  # a parameter target
    perturb(delta)
    with torch.no_grad(), delta.disabled():
        layer = model.model.layers[0].self_attn.o_proj
        tensors = delta.state_dict()
        key = "model.layers.0.self_attn.o_proj.weight"
        x = torch.randn(3, layer.in_features)
        want = F.linear(x, layer.weight + tensors[f"{key}.lora_B"] @ tensors[f"{key}.lora_A"] * 4)
    torch.testing.assert_close(layer(x), want)


def test_meta_plans_build_shapes_only():
    with torch.device("meta"):
        model, _ = mixtral()
    delta = dh.attach(model, SPEC)
    assert all(p.is_meta for p in delta.parameters())
    assert len(delta.paths) == 4


def test_a_root_parameter_trains_here_but_has_no_peft_form(tmp_path):
    model, inputs = seeded(lambda: (Experts(), {"x": torch.randn(7, 5)}))
    delta = dh.attach(model, dh.LoRA(targets=["stack"], r=2, init="random"))
    assert delta.paths == ["stack"]
    with delta.disabled():
        base = evaluate(model, inputs)
    assert not torch.equal(evaluate(model, inputs), base)
    with pytest.raises(dh.UnsupportedOperationError, match="root module"):
        delta.save_peft(tmp_path / "adapter")
    assert not (tmp_path / "adapter").exists()
