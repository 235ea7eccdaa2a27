"""The Delta lifecycle: names, state errors, merge rules, copies, checkpoints, rollback."""

from __future__ import annotations

import copy
import io
import subprocess
import sys

import pytest
import torch
from model_checks import assert_restored, snapshot
from torch import nn

import deltahooks as dh


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_import_does_not_import_transformers():
    code = "import sys, deltahooks; print('transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_names_are_unique_and_valid():
    model = make_model()
    dh.attach(model, dh.LoRA(targets=["0"]))
    with pytest.raises(dh.DeltaStateError, match="already attached"):
        dh.attach(model, dh.LoRA(targets=["2"]))
    with pytest.raises(dh.SpecError, match="identifier"):
        dh.attach(model, dh.LoRA(targets=["2"]), name="has.dot")
    other = dh.attach(model, dh.LoRA(targets=["0"]), name="other")
    assert set(dh.deltas(model)) == {"default", "other"}
    assert other.paths == ["0"]


def test_detached_delta_refuses_every_operation():
    model = make_model()
    delta = dh.attach(model, dh.LoRA(targets=["0"]))
    delta.detach()
    for action in (delta.detach, delta.merge, delta.unmerge, delta.state_dict, delta.disable):
        with pytest.raises(dh.DeltaStateError, match="detached"):
            action()
    with pytest.raises(dh.DeltaStateError, match="detached"):
        delta.save("never.safetensors")


def test_merge_rules():
    model = make_model()
    x = torch.randn(2, 4)
    delta = dh.attach(model, dh.LoRA(targets=["0", "2"], init="random"))
    model.train()
    with pytest.raises(dh.DeltaStateError, match=r"model\.eval\(\)"):
        delta.merge()
    model.eval()
    delta.merge()
    model.train()
    with pytest.raises(dh.DeltaStateError, match="unmerge"):
        model(x)
    with torch.no_grad():
        model(x)  # inference in train mode is fine
    model.eval()
    model(x)
    delta.unmerge()
    delta.unmerge()  # a no-op
    model.train()
    model(x).sum().backward()


def test_disabled_while_merged_restores_merge_afterwards():
    model = make_model().eval()
    x = torch.randn(2, 4)
    with torch.no_grad():
        base = model(x)
        delta = dh.attach(model, dh.LoRA(targets=["0"], init="random"))
        tuned = model(x)
        delta.merge()
        with delta.disabled():
            assert torch.equal(model(x), base)
            assert not delta.merged
        assert delta.merged and delta.enabled
        torch.testing.assert_close(model(x), tuned)


def test_detach_all_and_detach_while_merged():
    model = make_model().eval()
    before = snapshot(model)
    a = dh.attach(model, dh.LoRA(targets=["0"], init="random"), name="a")
    dh.attach(model, dh.Full(targets=["2"]), name="b")
    a.merge()
    dh.detach(model)
    assert dh.deltas(model) == {}
    assert_restored(model, before)


def test_freeze_base_false_keeps_flags_and_restores_none():
    model = make_model()
    model[0].bias.requires_grad_(False)
    delta = dh.attach(model, dh.LoRA(targets=["0"]), freeze_base=False)
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad
    delta.detach()
    assert model[0].weight.requires_grad and not model[0].bias.requires_grad


def test_failed_install_halfway_leaves_the_model_untouched(monkeypatch):
    from deltahooks.install import InstalledPart

    model = make_model()
    before = snapshot(model)
    install = InstalledPart.install_sites

    def broken(self, ledger, switch):
        if self.path == "2":  # the second part: the first is installed by then
            raise RuntimeError("boom")
        install(self, ledger, switch)

    monkeypatch.setattr(InstalledPart, "install_sites", broken)
    with pytest.raises(RuntimeError, match="boom"):
        dh.attach(model, [dh.LoRA(targets=["0"]), dh.Full(targets=["2"])])
    assert_restored(model, before)
    assert dh.deltas(model) == {}


def test_base_checkpoint_loads_strictly_and_full_checkpoint_round_trips():
    model = make_model()
    base_checkpoint = copy.deepcopy(model.state_dict())
    delta = dh.attach(model, dh.LoRA(targets=["0"], init="random"))
    model.load_state_dict(base_checkpoint)  # strict: delta keys may be missing
    broken = dict(base_checkpoint)
    del broken["0.bias"]
    with pytest.raises(RuntimeError, match=r"0\.bias"):
        model.load_state_dict(broken)  # a missing base key is still an error
    full = model.state_dict()
    assert "0.dh__default__lora_A" in full
    with torch.no_grad():
        delta.state_dict(keep_vars=True)["0.lora_B"].zero_()
    model.load_state_dict(full)
    assert torch.equal(delta.state_dict()["0.lora_B"], full["0.dh__default__lora_B"])


def test_deepcopy_carries_an_independent_working_delta():
    model = make_model().eval()
    x = torch.randn(2, 4)
    delta = dh.attach(model, [dh.LoRA(targets=["0"], init="random"), dh.Full(targets=["2"])])
    twin = copy.deepcopy(model)
    twin_delta = dh.deltas(twin)["default"]
    assert twin_delta is not delta and twin_delta.model is twin
    with torch.no_grad():
        assert torch.equal(twin(x), model(x))
        for p in twin_delta.parameters():
            p.add_(1.0)
        assert not torch.equal(twin(x), model(x))
    twin_delta.detach()
    assert list(twin.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert "0.dh__default__lora_A" in model.state_dict()  # the original is untouched
    delta.detach()


def test_torch_save_of_an_attached_model_round_trips():
    model = make_model().eval()
    x = torch.randn(2, 4)
    dh.attach(model, dh.LoRA(targets=["0"], init="random"))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    clone = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.equal(clone(x), model(x))
    dh.detach(clone)
    assert list(clone.state_dict()) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_the_delta_never_holds_the_model_as_a_child():
    model = make_model()
    delta = dh.attach(model, dh.LoRA(targets=["0"]))
    assert list(delta.children()) == []
    assert [name for name, _ in delta.named_modules()] == [""]
    assert delta.model is model
    with pytest.raises(TypeError, match="not called"):
        delta(torch.randn(1, 4))


def test_summary_names_targets_methods_and_counts():
    model = make_model()
    dh.attach(model, [dh.LoRA(targets=["0"], r=2), dh.Full(targets=["2"])])
    text = dh.summary(model)
    assert "delta 'default'" in text
    assert "0  lora  24 params" in text  # 2×4 + 8×2
    assert "2  full  27 params" in text  # 8×3 + 3
    assert "trainable: 51 of 118 parameters" in text


def test_merges_of_two_deltas_into_one_weight_unmerge_newest_first():
    model = make_model().eval()
    x = torch.randn(2, 4)
    before = snapshot(model)
    a = dh.attach(model, dh.LoRA(targets=["0"], init="random"), name="a")
    b = dh.attach(model, dh.LoRA(targets=["0"], init="random"), name="b")
    with torch.no_grad():
        hooked = model(x)
        a.merge()
        b.merge()
        torch.testing.assert_close(model(x), hooked)
        with pytest.raises(dh.DeltaStateError, match="unmerge 'b' first"):
            a.unmerge()
        torch.testing.assert_close(model(x), hooked)  # the refusal changed nothing
        dh.detach(model)  # unmerges newest first by itself
    assert_restored(model, before)


def test_merging_under_another_deltas_full_copy_is_refused_until_it_merges():
    model = make_model().eval()
    x = torch.randn(2, 4)
    full = dh.attach(model, dh.Full(targets=["0"]), name="full")
    lora = dh.attach(model, dh.LoRA(targets=["0"], init="random"), name="lora")
    with torch.no_grad():
        for p in full.parameters():
            p.mul_(2)
        hooked = model(x)
        with pytest.raises(dh.DeltaStateError, match="merge 'full' first"):
            lora.merge()
        full.merge()
        lora.merge()
        torch.testing.assert_close(model(x), hooked)
        lora.unmerge()
        full.unmerge()
        torch.testing.assert_close(model(x), hooked)


def test_a_merged_delta_keeps_a_single_guard_hook():
    model = make_model().eval()
    delta = dh.attach(model, [dh.LoRA(targets=["0", "2"], init="random"), dh.Full(targets=["2"])])

    def hooks():
        return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())

    assert hooks() == 3 + 1  # and the liveness checks' hook on the root (deltahooks.liveness)
    delta.merge()
    assert hooks() == 1  # the per-layer hooks are gone: the base forward runs as is
    delta.unmerge()
    assert hooks() == 3 + 1
