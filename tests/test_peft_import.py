"""Importing PEFT LoRA adapters: same outputs as PEFT, and clear errors for what does not fit."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from model_checks import assert_restored, snapshot
from torch import nn

import deltahooks as dh

peft = pytest.importorskip("peft")


class Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.classifier = nn.Linear(8, 2)

    def forward(self, ids):
        h = self.emb(ids)
        return self.classifier(torch.tanh(self.q(h) + self.v(h)))


@pytest.fixture
def adapter(tmp_path):
    """A PEFT adapter with non-zero factors, a rank and an alpha override and a saved head."""
    torch.manual_seed(0)
    base = Model().eval()
    config = peft.LoraConfig(
        r=2,
        lora_alpha=4,
        target_modules=["q", "v", "emb"],
        modules_to_save=["classifier"],
        rank_pattern={"v": 3},
        alpha_pattern={"q": 8},
        use_rslora=True,
    )
    peft_model = peft.get_peft_model(copy.deepcopy(base), config).eval()
    with torch.no_grad():
        for param in peft_model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.3)
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = torch.randint(0, 10, (3, 5))
    with torch.no_grad():
        expected = peft_model(ids)
    return tmp_path / "adapter", base, ids, expected


def test_imported_adapter_reproduces_peft_outputs(adapter):
    path, base, ids, expected = adapter
    delta = dh.load_peft(base, path)
    with torch.no_grad():
        torch.testing.assert_close(base(ids), expected)
    assert sorted(delta.paths) == ["classifier", "emb", "q", "v"]
    assert delta.state_dict()["v.lora_A"].shape == (3, 8)


def broken(path, tmp_path, change):
    target = tmp_path / "broken"
    shutil.copytree(path, target)
    change(target)
    return target


def rewrite_config(target, **updates):
    config = json.loads((target / "adapter_config.json").read_text())
    config.update(updates)
    (target / "adapter_config.json").write_text(json.dumps(config))


def rename_key(target, old, new):
    from safetensors.torch import load_file, save_file

    tensors = load_file(target / "adapter_model.safetensors")
    tensors = {k.replace(old, new): v for k, v in tensors.items()}
    save_file(tensors, target / "adapter_model.safetensors")


CASES = [
    (
        "missing config",
        lambda t: (t / "adapter_config.json").unlink(),
        dh.DeltaFileError,
        "no adapter_config.json",
    ),
    (
        "unsupported peft_type",
        lambda t: rewrite_config(t, peft_type="POLY"),
        dh.DeltaFileError,
        "'POLY' is not supported",
    ),
    (
        "unknown target names",
        lambda t: rename_key(t, ".q.", ".query."),
        dh.DeltaFileError,
        r"'query'.*Closest module paths: \[.*'q'",
    ),
    (
        "DoRA without magnitudes",
        lambda t: rewrite_config(t, use_dora=True),
        dh.DeltaFileError,
        "without their magnitude vector",
    ),
    (
        "missing weights",
        lambda t: (t / "adapter_model.safetensors").unlink(),
        dh.DeltaFileError,
        "no adapter_model.safetensors",
    ),
]


@pytest.mark.parametrize("case, change, error, message", CASES, ids=[c[0] for c in CASES])
def test_bad_adapters_raise_and_change_nothing(adapter, tmp_path, case, change, error, message):
    path, base, _, _ = adapter
    bad = broken(path, tmp_path, change)
    before = snapshot(base)
    with pytest.raises(error, match=message):
        dh.load_peft(base, bad)
    assert_restored(base, before)
    assert dh.deltas(base) == {}
