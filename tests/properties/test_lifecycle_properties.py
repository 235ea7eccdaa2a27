"""The five lifecycle promises, over random module trees, targets, ranks and dtypes."""

from __future__ import annotations

import copy

import torch
from hypothesis import given
from hypothesis import strategies as st
from model_checks import assert_outputs_equal, assert_restored, snapshot
from strategies import adaptable_paths, lora_specs, models

import deltahooks as dh

TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-4, torch.bfloat16: 0.1}


def train_step(model: torch.nn.Module, x: torch.Tensor) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=0.01)
    model.train()
    loss = model(x).float().pow(2).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    model.eval()


@st.composite
def model_and_specs(draw, init="random", with_full=True):
    model, x, recipe = draw(models())
    spec, _ = draw(lora_specs(model, init=init))
    specs = [spec]
    if with_full and draw(st.booleans()):
        full = draw(st.sampled_from(adaptable_paths(model)))
        specs.append(dh.Full(targets=dh.Paths([full])))
    return model, x, recipe, specs


@given(model_and_specs())
def test_attach_train_detach_restores_everything(case):
    model, x, _, specs = case
    before = snapshot(model)
    with torch.no_grad():
        y0 = model(x)
    delta = dh.attach(model, specs)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "dh__" not in n)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if "dh__" in n
    }
    train_step(model, x)
    delta.detach()
    assert_restored(model, before)
    with torch.no_grad():
        assert_outputs_equal(model(x), y0)
    assert dh.deltas(model) == {}


@given(model_and_specs(init="default", with_full=False), st.sampled_from(["default", "gaussian"]))
def test_zero_init_lora_leaves_outputs_unchanged(case, init):
    model, x, _, specs = case
    spec = specs[0]
    spec = dh.LoRA(targets=spec.targets, r=spec.r, alpha=spec.alpha, init=init)
    with torch.no_grad():
        y0 = model(x)
        dh.attach(model, spec)
        assert_outputs_equal(model(x), y0)


@given(case=model_and_specs())
def test_save_then_load_on_a_fresh_copy_reproduces_outputs(tmp_path_factory, case):
    model, x, _, specs = case
    fresh = copy.deepcopy(model)
    delta = dh.attach(model, specs)
    train_step(model, x)
    path = tmp_path_factory.mktemp("delta") / "d.safetensors"
    delta.save(path)
    loaded = dh.load(fresh, path)
    assert list(loaded.state_dict()) == list(delta.state_dict())
    with torch.no_grad():
        assert_outputs_equal(fresh(x), model(x))
    for key, value in delta.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)


@given(model_and_specs())
def test_merge_matches_hooks_and_unmerge_is_bit_exact(case):
    model, x, recipe, specs = case
    dtype = recipe[2]
    delta = dh.attach(model, specs)
    model.eval()
    with torch.no_grad():
        hooked = model(x)
        unmerged_state = snapshot(model)
        delta.merge()
        delta.merge()  # a no-op
        merged = model(x)
        tol = TOLERANCE[dtype] * (1 + hooked.abs().max().item())
        assert (merged.double() - hooked.double()).abs().max().item() <= tol
        delta.unmerge()
        assert_restored(model, unmerged_state, same_hook_ids=False)
        assert_outputs_equal(model(x), hooked)


@given(model_and_specs(), st.booleans())
def test_two_deltas_detach_in_either_order(case, first_out_first):
    model, x, _, specs = case
    other = [dh.LoRA(targets=dh.Paths(adaptable_paths(model)[:1]), r=2, init="random")]
    before = snapshot(model)
    a = dh.attach(model, specs, name="a")
    b = dh.attach(model, other, name="b")
    train_step(model, x)
    assert set(dh.deltas(model)) == {"a", "b"}
    first, second = (a, b) if first_out_first else (b, a)
    first.detach()
    assert all(not p.requires_grad for n, p in model.named_parameters() if "dh__" not in n)
    second.detach()
    assert_restored(model, before)
