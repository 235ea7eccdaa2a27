"""AdaLoRA: SVD-form LoRA, PEFT's rank-budget schedule and masks, the orthogonality term."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from method_bar import (
    check_refused,
    evaluate,
    perturb,
    seeded,
)
from model_checks import assert_restored, snapshot
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from method_nets import adalora_net as make_net  # noqa: E402
from method_table import ADALORA_PLACES as PLACES  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# AdaLoRA's rows in tests/method_table.py

NET_SPEC = dh.AdaLoRA(targets=["conv", "proj"], init_r=3, target_r=2, total_step=10)


def test_the_formula_against_f_linear_and_conv2d():
    model, inputs = seeded(make_net)
    delta = dh.attach(
        model,
        dh.AdaLoRA(
            targets=["conv", "proj"], init_r=3, target_r=1, total_step=10, alpha=6, init="random"
        ),
    )
    s = delta.state_dict()
    scale = 6 / (3 + 1e-5)
    x = inputs["pixels"]
    with torch.no_grad(), delta.disabled():
        conv = model.conv
        kernel = (s["conv.lora_B"] @ (s["conv.lora_A"] * s["conv.lora_E"])).view_as(conv.weight)
        h = torch.relu(conv(x) + F.conv2d(x, kernel * scale, padding=1)).mean(dim=(2, 3))
        update = s["proj.lora_B"] @ (s["proj.lora_A"] * s["proj.lora_E"])
        want = model.proj(h) + F.linear(h, update) * scale
    torch.testing.assert_close(evaluate(model, inputs), want)


def test_orthogonality_loss_is_the_mean_frobenius_distance():
    model, _ = seeded(make_net)
    delta = dh.attach(model, NET_SPEC)
    perturb(delta)
    s = delta.state_dict()
    eye = torch.eye(3)
    norms = [
        torch.linalg.norm(s[f"{p}.lora_A"] @ s[f"{p}.lora_A"].T - eye) for p in ("conv", "proj")
    ] + [torch.linalg.norm(s[f"{p}.lora_B"].T @ s[f"{p}.lora_B"] - eye) for p in ("conv", "proj")]
    value = dh.adalora_allocator(delta).orthogonality_loss()
    torch.testing.assert_close(value, 0.5 * torch.stack(norms).mean())
    value.backward()
    assert all(p.grad is not None for n, p in delta.named_parameters() if "lora_E" not in n)


def test_rank_schedule_equals_peft():
    peft = pytest.importorskip("peft")
    from peft.tuners.adalora.layer import RankAllocator as PeftAllocator

    config = peft.AdaLoraConfig(
        target_modules=["q_proj", "v_proj"],
        init_r=6,
        target_r=2,
        tinit=3,
        tfinal=4,
        total_step=40,
        deltaT=3,
    )
    model, _ = seeded(MODELS["llama"])
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    reference = PeftAllocator(theirs.base_model.model, config, "default")
    spec = dh.AdaLoRA(
        targets=["q_proj", "v_proj"],
        init_r=6,
        target_r=2,
        tinit=3,
        tfinal=4,
        total_step=40,
        deltaT=3,
    )
    allocator = dh.adalora_allocator(dh.attach(model, spec))
    for step in range(0, 45):
        assert allocator.budget(step) == reference.budget_schedule(step), step


def test_masks_the_same_triplets_as_peft_for_the_same_scores():
    peft = pytest.importorskip("peft")
    model, _ = seeded(MODELS["llama"])
    config = peft.AdaLoraConfig(
        target_modules=["q_proj", "v_proj"],
        init_r=5,
        target_r=2,
        total_step=20,
        init_lora_weights=False,
    )
    theirs = peft.get_peft_model(copy.deepcopy(model), config)
    reference = theirs.base_model.rankallocator
    allocator = dh.adalora_allocator(
        dh.attach(
            model,
            dh.AdaLoRA(
                targets=["q_proj", "v_proj"], init_r=5, target_r=2, total_step=20, init="random"
            ),
        )
    )
    generator = torch.Generator().manual_seed(3)
    for name, p in theirs.base_model.model.named_parameters():  # the same scores on both sides
        if "lora_" not in name:
            continue
        ipt, unc = (
            torch.rand(p.shape, generator=generator),
            torch.rand(p.shape, generator=generator),
        )
        reference.exp_avg_ipt[name], reference.exp_avg_unc[name] = ipt, unc
        ours = name.replace(".default", "")
        allocator.exp_avg_ipt[ours], allocator.exp_avg_unc[ours] = ipt.clone(), unc.clone()
    for budget in (9, 6, 4):
        want = reference.mask_to_budget(theirs.base_model.model, budget)
        got = allocator.mask_to_budget(budget)
        assert {k.replace(".lora_E.default", ""): v for k, v in want.items()} == got
        assert sum(map(sum, got.values())) == budget


def test_bad_inputs_leave_the_model_unchanged():
    with pytest.raises(TypeError, match="total_step"):
        dh.AdaLoRA(targets=["q"])
    with pytest.raises(dh.SpecError, match="total_step=0 must be a positive integer"):
        dh.AdaLoRA(targets=["q"], total_step=0)
    with pytest.raises(dh.SpecError, match="target_r=9 is above init_r=4"):
        dh.AdaLoRA(targets=["q"], total_step=10, init_r=4, target_r=9)
    with pytest.raises(dh.SpecError, match="leave no steps"):
        dh.AdaLoRA(targets=["q"], total_step=10, tinit=5, tfinal=5)
    with pytest.raises(dh.SpecError, match=r"beta1=1 must be a number in \(0, 1\)"):
        dh.AdaLoRA(targets=["q"], total_step=10, beta1=1)
    model, _ = seeded(make_net)
    model.add_module("norm", nn.LayerNorm(5))
    check_refused(
        model, dh.AdaLoRA(targets=["norm"], total_step=9), dh.UnsupportedModuleError, "LayerNorm"
    )
    model.add_module("grouped", nn.Conv2d(4, 4, 1, groups=2))
    check_refused(
        model, dh.AdaLoRA(targets=["grouped"], total_step=9), dh.UnsupportedModuleError, "groups=1"
    )


def test_the_allocator_refuses_what_it_cannot_do():
    model, _ = seeded(make_net)
    two = dh.attach(
        model,
        [dh.AdaLoRA(targets=["conv"], total_step=9), dh.AdaLoRA(targets=["proj"], total_step=9)],
    )
    with pytest.raises(dh.UnsupportedOperationError, match="needs exactly one"):
        dh.adalora_allocator(two)
    two.detach()
    delta = dh.attach(model, NET_SPEC)
    allocator = dh.adalora_allocator(delta)
    with pytest.raises(dh.DeltaStateError, match="no gradient"):
        allocator.update_and_allocate(1)
    delta.merge()
    with pytest.raises(dh.DeltaStateError, match="merged"):
        allocator.update_and_allocate(1)


# ------------------------------------------------------------------ PEFT parity
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_peft_parity_outputs_training_schedule_and_pruned_files(name, tmp_path):
    peft = pytest.importorskip("peft")
    model, inputs = seeded(MODELS[name])
    ours, fresh = copy.deepcopy(model), copy.deepcopy(model)
    config = peft.AdaLoraConfig(
        target_modules=PLACES[name],
        init_r=4,
        target_r=2,
        tinit=1,
        tfinal=2,
        total_step=6,
        lora_alpha=16,
        init_lora_weights=False,
        task_type="CAUSAL_LM",  # PeftModelForCausalLM's forward adds the orthogonality term
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fan_in_fan_out notes
        theirs = peft.get_peft_model(model, config)
        theirs.save_pretrained(tmp_path / "start")
    delta = dh.load_peft(ours, tmp_path / "start")
    assert delta.specs[0].total_step == 6 and delta.specs[0].alpha == 16
    theirs.eval()
    torch.testing.assert_close(evaluate(ours, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5)

    allocator = dh.adalora_allocator(delta)
    labels = {"labels": inputs["input_ids"]}
    theirs.train()
    ours.train()
    for m in (theirs, ours):  # train mode for the allocator, no dropout for determinism
        for module in m.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    opt_theirs = torch.optim.SGD([p for p in theirs.parameters() if p.requires_grad], lr=0.01)
    opt_ours = torch.optim.SGD(delta.parameters(), lr=0.01)
    for step in range(1, 6):  # warm-up, two budget steps, the final mask, a masked step
        loss_theirs = theirs(**inputs, **labels).loss  # PEFT adds its orthogonality term
        loss_ours = ours(**inputs, **labels).loss + allocator.orthogonality_loss()
        loss_theirs.backward()
        loss_ours.backward()
        torch.testing.assert_close(loss_ours.item(), loss_theirs.item(), rtol=0, atol=1e-5)
        opt_theirs.step()
        opt_ours.step()
        theirs.base_model.update_and_allocate(step)
        allocator.update_and_allocate(step)
        opt_theirs.zero_grad()
        opt_ours.zero_grad()
        for path in delta.paths:
            peft_e = theirs.base_model.model.get_submodule(path).lora_E["default"]
            our_e = delta.state_dict()[f"{path}.lora_E"]
            assert torch.equal(our_e == 0, peft_e == 0), (step, path)
    pattern = theirs.peft_config["default"].rank_pattern
    assert {
        k.replace(".lora_E.default", ""): v for k, v in pattern.items()
    } == allocator.rank_pattern
    assert 0 < sum(map(sum, allocator.rank_pattern.values())) < 4 * len(delta.paths)
    theirs.eval()
    ours.eval()
    want = evaluate(theirs, inputs)
    torch.testing.assert_close(evaluate(ours, inputs), want, rtol=0, atol=1e-5)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs.save_pretrained(tmp_path / "pruned")  # only the kept triplets
    loaded = dh.load_peft(fresh, tmp_path / "pruned")
    torch.testing.assert_close(evaluate(fresh, inputs), want, rtol=0, atol=1e-5)
    loaded.merge()
    theirs.merge_adapter()
    torch.testing.assert_close(evaluate(fresh, inputs), evaluate(theirs, inputs), rtol=0, atol=1e-5)


def test_peft_import_refuses_stray_tensors_and_bad_patterns(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    peft = pytest.importorskip("peft")
    model, _ = seeded(MODELS["llama"])
    ours = copy.deepcopy(model)
    config = peft.AdaLoraConfig(target_modules=["q_proj"], init_r=3, target_r=1, total_step=9)
    peft.get_peft_model(model, config).save_pretrained(tmp_path)
    before = snapshot(ours)
    weights = tmp_path / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({**tensors, "base_model.model.lm_head.lora_Z": torch.ones(2)}, weights)
    with pytest.raises(dh.DeltaFileError, match="belong to no AdaLoRA layer"):
        dh.load_peft(ours, tmp_path)
    save_file(tensors, weights)
    config_path = tmp_path / "adapter_config.json"
    settings = json.loads(config_path.read_text())
    path = "model.layers.0.self_attn.q_proj.lora_E"
    config_path.write_text(json.dumps({**settings, "rank_pattern": {path: [True, False]}}))
    with pytest.raises(dh.DeltaFileError, match="must be 3 booleans"):
        dh.load_peft(ours, tmp_path)
    config_path.write_text(json.dumps({**settings, "rank_pattern": {path: [True, False, True]}}))
    with pytest.raises(dh.DeltaFileError, match="keeps 2"):
        dh.load_peft(ours, tmp_path)
    assert_restored(ours, before)
