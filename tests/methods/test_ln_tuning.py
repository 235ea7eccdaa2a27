"""LNTuning: norm layers read ``weight + Δw`` and ``bias + Δb``; PEFT's LN tuning computes the same."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from method_bar import (
    assert_unmerged,
    check_refused,
    evaluate,
    perturb,
    seeded,
)
from model_checks import assert_outputs_equal, assert_restored, snapshot
from torch import nn

import deltahooks as dh

transformers = pytest.importorskip("transformers")

from method_nets import norm_net as make_net  # noqa: E402
from tiny_models import MODELS  # noqa: E402  (after the importorskip)

# the bar (identity, training, files, detach, merge, checkpointing, compile) runs for
# LNTuning's rows in tests/method_table.py


def test_default_targets_every_norm_and_the_formula_holds():
    model, _ = seeded(make_net)
    delta = dh.attach(model, dh.LNTuning())
    assert delta.paths == ["bn", "gn", "ln", "rms"]
    assert sorted(delta.state_dict()) == [
        "bn.ln_bias",
        "bn.ln_weight",
        "bn.num_batches_tracked",
        "bn.running_mean",
        "bn.running_var",
        "gn.ln_bias",
        "gn.ln_weight",
        "ln.ln_bias",
        "ln.ln_weight",
        "rms.ln_weight",  # RMSNorm has no bias: nothing is added for one
    ]
    perturb(delta)
    state = delta.state_dict()
    x = torch.randn(3, 6)
    with torch.no_grad(), delta.disabled():
        w, b = model.ln.weight + state["ln.ln_weight"], model.ln.bias + state["ln.ln_bias"]
        want = F.rms_norm(
            F.layer_norm(x, (6,), w, b), (6,), model.rms.weight + state["rms.ln_weight"]
        )
    with torch.no_grad():
        torch.testing.assert_close(model.rms(model.ln(x)), want)


def test_base_keys_stay_and_a_base_checkpoint_loads_while_attached():
    model, inputs = seeded(make_net)
    checkpoint = copy.deepcopy(model.state_dict())
    delta = dh.attach(model, dh.LNTuning())
    perturb(delta)
    assert [k for k in model.state_dict() if "dh__" not in k] == list(checkpoint)
    model.load_state_dict(checkpoint, strict=True)
    tuned = evaluate(model, inputs)
    with delta.disabled():
        assert not torch.equal(evaluate(model, inputs), tuned)


def test_batchnorm_statistics_train_on_copies_and_the_base_buffers_never_change(tmp_path):
    model, inputs = seeded(make_net)
    fresh, before = copy.deepcopy(model), snapshot(model)
    delta = dh.attach(model, dh.LNTuning(targets=["bn"]))
    optimizer = torch.optim.SGD(delta.parameters(), lr=0.1)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(**inputs).pow(2).mean().backward()
        optimizer.step()
    model.eval()
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(model.state_dict()[f"bn.{name}"], before.values[f"bn.{name}"])
        assert not torch.equal(delta.state_dict()[f"bn.{name}"], before.values[f"bn.{name}"])
    assert delta.state_dict()["bn.num_batches_tracked"].item() == 3
    tuned = evaluate(model, inputs)
    delta.save(tmp_path / "bn.safetensors")
    dh.load(fresh, tmp_path / "bn.safetensors")
    assert_outputs_equal(evaluate(fresh, inputs), tuned)
    state = snapshot(model)
    delta.merge()  # the copies' statistics go in place with the shifted weights
    torch.testing.assert_close(evaluate(model, inputs), tuned)
    delta.unmerge()
    assert_unmerged(model, state)
    delta.detach()
    assert_restored(model, before)


def test_peft_parity_on_tiny_llama():
    """PEFT trains copies of the norms; with the copies at base + Δ, the logits are equal."""
    peft = pytest.importorskip("peft")
    model, inputs = seeded(MODELS["llama"])
    ours = copy.deepcopy(model)
    theirs = peft.get_peft_model(model, peft.LNTuningConfig()).eval()
    delta = dh.attach(ours, dh.LNTuning())
    perturb(delta)
    copies = {
        name: module
        for name, module in theirs.named_modules()
        if name.endswith("ln_tuning_layers.default")
    }
    assert len(copies) == len(delta.paths) == 5  # 2 per layer and the final norm
    with torch.no_grad():
        for path in delta.paths:
            (copied,) = (
                m for name, m in copies.items() if name.endswith(f"{path}.ln_tuning_layers.default")
            )
            base = ours.get_submodule(path).parametrizations.weight.original
            copied.weight.copy_(base + delta.state_dict()[f"{path}.ln_weight"])
    assert_outputs_equal(evaluate(ours, inputs), evaluate(theirs, inputs))


def test_ln_tuning_and_bitfit_on_one_layernorm_merge_together():
    model, inputs = seeded(make_net)
    delta = dh.attach(model, [dh.LNTuning(targets=["ln"]), dh.BitFit(targets=["ln"])])
    perturb(delta)
    hooked, state = evaluate(model, inputs), snapshot(model)
    delta.merge()  # BitFit's bias merges under LNTuning's parametrized bias
    torch.testing.assert_close(evaluate(model, inputs), hooked)
    delta.unmerge()
    assert_unmerged(model, state)


@pytest.mark.parametrize("copier", ["deepcopy", "pickle"])
def test_a_deep_copy_or_pickle_gives_an_independent_delta(copier):
    model, inputs = seeded(make_net)
    base = evaluate(model, inputs)
    keys = list(model.state_dict())
    delta = dh.attach(model, dh.LNTuning())
    perturb(delta)
    tuned = evaluate(model, inputs)
    twin = copy.deepcopy(model) if copier == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert_outputs_equal(evaluate(twin, inputs), tuned)
    dh.detach(twin)
    assert_outputs_equal(evaluate(twin, inputs), base)
    assert list(twin.state_dict()) == keys
    assert all(type(a) is type(b) for a, b in zip(twin.modules(), make_net()[0].modules()))
    assert_outputs_equal(evaluate(model, inputs), tuned)


def test_bad_inputs_leave_the_model_unchanged():
    model, _ = seeded(make_net)
    check_refused(model, dh.LNTuning(targets=["ln", "proj"]), dh.UnsupportedModuleError, "Linear")
    model.add_module("plain", nn.LayerNorm(6, elementwise_affine=False))
    check_refused(model, dh.LNTuning(targets=["plain"]), dh.UnsupportedModuleError, "affine")
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    check_refused(mlp, dh.LNTuning(), dh.TargetError, "has none")
    with pytest.raises(dh.SpecError, match="targets is empty"):
        dh.LNTuning(targets=[])
