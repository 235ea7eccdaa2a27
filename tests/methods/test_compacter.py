"""Compacter: a bottleneck of PHM layers, Σ_i A_i ⊗ (s_i t_iᵀ), with rules shared by all layers."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from memory_limits import growth_limit
from method_bar import check_refused, perturb
from model_checks import assert_outputs_equal, assert_restored, snapshot
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import deltahooks as dh

# the bar (identity, training, files, detach, merge refused, checkpointing, compile) runs for
# Compacter's rows in tests/method_table.py


def kron_sum(rule, s, t):
    """Σ_i A_i ⊗ (s_i t_iᵀ), written with torch.kron as the paper writes it."""
    return sum(torch.kron(rule[i], s[i] @ t[i].T) for i in range(rule.shape[0]))


def reference(y, t, rule_down, rule_up, act=F.gelu):
    """The adapter on ``y`` with the hidden state zero-padded to the PHM width."""
    down = kron_sum(rule_down, t["phm_down_s"], t["phm_down_t"])
    up = kron_sum(rule_up, t["phm_up_s"], t["phm_up_t"])
    width = y.shape[-1]
    hidden = act(F.pad(y, (0, down.shape[1] - width)) @ down.T + t["phm_down_bias"])
    return y + (hidden @ up.T)[..., :width] + t["phm_up_bias"]


def own(state, prefix):
    return {key[len(prefix) :]: value for key, value in state.items() if key.startswith(prefix)}


def make_model(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, width), nn.Linear(width, width)).eval()


@pytest.mark.parametrize("width", [8, 6])  # 6: not divisible by phm_dim=4, padded to 8
def test_output_matches_the_kronecker_formula(width):
    model, x = make_model(width), torch.randn(5, 6)
    delta = dh.attach(model, dh.Compacter(targets=["0"], reduction_factor=2))
    with delta.disabled():
        y = model[0](x)
    assert_outputs_equal(model[0](x), y)  # up's s starts at zero: unchanged at attach
    perturb(delta)
    state = delta.state_dict()
    size = {8: 4, 6: 4}[width]  # 8 // 2 = 4; 6 // 2 = 3, rounded up to a multiple of 4
    assert state["0.phm_down_s"].shape == (4, size // 4, 1)
    assert state["0.phm_down_t"].shape == (4, 2, 1)  # the padded width 8, over 4 blocks
    assert state["0.phm_up_bias"].shape == (width,)
    rule = state["phm_rule"]
    torch.testing.assert_close(model[0](x), reference(y, own(state, "0."), rule, rule))


def test_the_bottleneck_rounds_up_to_a_multiple_of_phm_dim():
    model = nn.Sequential(nn.Linear(4, 10))
    delta = dh.attach(model, dh.Compacter(targets=["0"], phm_dim=3))
    state = delta.state_dict()
    # 10 // 16 = 0 -> 1 -> 3; the width 10 is padded to 12
    assert state["0.phm_down_bias"].shape == (3,)
    assert state["0.phm_down_t"].shape == (3, 4, 1)
    assert state["phm_rule"].shape == (3, 3, 3)


def test_the_shared_rule_is_one_tensor_stored_once_and_trained_once(tmp_path):
    model, x = make_model(), torch.randn(5, 6)
    delta = dh.attach(model, dh.Compacter(targets=nn.Linear, reduction_factor=2, phm_rank=2))
    perturb(delta)
    rules = [name for name, _ in model.named_parameters() if "phm_rule" in name]
    assert rules == ["dh__default__phm_rule"]  # on the root, not per layer
    assert list(delta.shared) == ["phm_rule"]
    path = tmp_path / "c.safetensors"
    delta.save(path)
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        assert [k for k in keys if "phm_rule" in k] == ["phm_rule"]
        assert handle.get_tensor("phm_rule").shape == (4, 4, 4)
    assert len(keys) == 1 + 2 * 6

    # a reference that uses ONE leaf tensor for both layers: same output, same gradient
    state = delta.state_dict()
    rule = state["phm_rule"].clone().requires_grad_()
    w0, w1 = model[0].weight, model[1].weight
    y0 = reference(F.linear(x, w0, model[0].bias), own(state, "0."), rule, rule)
    want = reference(F.linear(y0, w1, model[1].bias), own(state, "1."), rule, rule)
    got = model(x)
    torch.testing.assert_close(got, want)
    want.pow(2).sum().backward()
    got.pow(2).sum().backward()
    shared = delta.shared["phm_rule"]
    torch.testing.assert_close(shared.grad, rule.grad)
    before = shared.detach().clone()
    torch.optim.SGD(delta.parameters(), lr=0.1).step()
    torch.testing.assert_close(shared.detach(), before - 0.1 * rule.grad)  # one step, once
    state = delta.state_dict()
    with torch.no_grad():
        new = state["phm_rule"]
        y0 = reference(F.linear(x, w0, model[0].bias), own(state, "0."), new, new)
        want = reference(F.linear(y0, w1, model[1].bias), own(state, "1."), new, new)
        torch.testing.assert_close(model(x), want)  # every layer sees the updated rule


def test_unshared_rules_are_per_layer():
    model, x = make_model(), torch.randn(5, 6)
    delta = dh.attach(model, dh.Compacter(targets=["1"], reduction_factor=2, shared_phm_rule=False))
    assert delta.shared == {}
    perturb(delta)
    state = own(delta.state_dict(), "1.")
    assert state["phm_rule_down"].shape == state["phm_rule_up"].shape == (4, 4, 4)
    with delta.disabled():
        y = model(x)
    want = reference(y, state, state["phm_rule_down"], state["phm_rule_up"])
    torch.testing.assert_close(model(x), want)


def test_bad_inputs_are_refused_with_the_model_unchanged():
    with pytest.raises(dh.SpecError, match="phm_dim=0 must be a positive integer"):
        dh.Compacter(targets=["0"], phm_dim=0)
    with pytest.raises(dh.SpecError, match="shared_phm_rule='yes' must be True or False"):
        dh.Compacter(targets=["0"], shared_phm_rule="yes")
    model = nn.Sequential(nn.Linear(6, 3), nn.Conv1d(3, 3, 1))
    check_refused(
        model,
        dh.Compacter(targets=["0"]),
        dh.SpecError,
        r"phm_dim=4 is larger than the hidden width 3 of '0'; use phm_dim <= 3",
    )
    check_refused(
        model,
        dh.Compacter(targets=["1"], phm_dim=2),
        dh.UnsupportedModuleError,
        r"'1' \(Conv1d\) works on channels first",
    )


@pytest.mark.parametrize(
    ("key", "lie"),
    [("phm_dim", 2**40), ("phm_dim", 10**8), ("phm_rank", 2**40), ("phm_rank", 2**62)],
)
def test_a_file_that_lies_about_its_sizes_is_refused_cheaply(key, lie, tmp_path):
    model = make_model()
    dh.attach(model, dh.Compacter(targets=nn.Linear, reduction_factor=2)).save(
        tmp_path / "c.safetensors"
    )
    with safe_open(str(tmp_path / "c.safetensors"), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    header = json.loads(meta["delta"])
    header["parts"][0]["hyperparameters"][key] = lie
    save_file(
        tensors, str(tmp_path / "lie.safetensors"), metadata={**meta, "delta": json.dumps(header)}
    )
    fresh = make_model()
    before = snapshot(fresh)
    with growth_limit(50 * 2**20), pytest.raises(dh.DeltaFileError):
        dh.load(fresh, tmp_path / "lie.safetensors")
    assert_restored(fresh, before)
