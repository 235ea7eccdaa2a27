"""Full: trains copies of whole modules; the originals stay untouched and come back."""

from __future__ import annotations

import pytest
import torch
from method_nets import FullHead
from model_checks import assert_restored, snapshot
from torch import nn

import deltahooks as dh


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), FullHead())


def test_trains_copies_and_leaves_originals_untouched():
    model = make_model()
    before = snapshot(model)
    originals = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(8, 4)
    delta = dh.attach(model, dh.Full(targets=["1"]))
    assert sorted(delta.state_dict()) == sorted(
        f"1.{k[2:]}" for k in originals if k.startswith("1.")
    )
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    model(x).pow(2).mean().backward()
    optimizer.step()
    # the module's own attribute reads the trained copy; state_dict keeps the originals
    assert not torch.equal(model[1].dense.weight, originals["1.dense.weight"])
    assert torch.equal(model.state_dict()["1.dense.weight"], originals["1.dense.weight"])
    # batch-norm statistics were updated on the copy, not the original buffer
    assert torch.equal(model[1].norm._buffers["running_mean"], originals["1.norm.running_mean"])
    assert not torch.equal(
        delta.state_dict()["1.norm.running_mean"], originals["1.norm.running_mean"]
    )
    delta.detach()
    assert_restored(model, before)


def test_disabled_and_merged_forward_use_the_right_weights():
    model = make_model().eval()
    x = torch.randn(8, 4)
    with torch.no_grad():
        base = model(x)
        delta = dh.attach(model, dh.Full(targets=["1"]))
        for p in delta.parameters():
            p.add_(0.1)
        tuned = model(x)
        assert not torch.equal(tuned, base)
        with delta.disabled():
            assert torch.equal(model(x), base)
        assert torch.equal(model(x), tuned)
        delta.merge()
        assert torch.equal(model(x), tuned)
        assert torch.equal(model.state_dict()["1.dense.weight"], model[1].dense.dh__default__weight)
        delta.unmerge()
        assert torch.equal(model(x), tuned)
        delta.detach()
        assert torch.equal(model(x), base)


def test_lora_and_full_together_merge_to_copy_plus_update():
    model = make_model().eval()
    x = torch.randn(8, 4)
    spec = [dh.LoRA(targets=["1.dense"], r=2, init="random"), dh.Full(targets=["1"])]
    delta = dh.attach(model, spec)
    with torch.no_grad():
        for name, p in delta.named_parameters():
            if not name.endswith("lora_A") and not name.endswith("lora_B"):
                p.mul_(1.5)
        hooked = model(x)
        delta.merge()
        torch.testing.assert_close(model(x), hooked)


def test_a_module_without_parameters_is_refused():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU())
    with pytest.raises(dh.UnsupportedModuleError, match="nothing to train"):
        dh.attach(model, dh.Full(targets=["1"]))


def test_overlapping_full_targets_in_one_delta_are_refused():
    model = make_model()
    with pytest.raises(dh.SpecError, match="must not overlap"):
        dh.attach(model, [dh.Full(targets=["1"]), dh.Full(targets=["1.out"])])
    assert dh.deltas(model) == {}
