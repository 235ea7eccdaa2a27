"""Mistakes with files and folders: each gets a deltahooks error naming the path and the fix.

(The catalogue of attach/spec mistakes is test_bad_input.py; damaged files are test_io.py.)
"""

from __future__ import annotations

import json
import os
import stat

import pytest
import torch
from model_checks import assert_restored, snapshot
from safetensors import safe_open
from torch import nn

import deltahooks as dh


class Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.proj(x))


class Outer(nn.Module):
    """Like a HF ...ForCausalLM around its base model: paths gain a 'model.' prefix."""

    def __init__(self) -> None:
        super().__init__()
        self.model = Inner()

    def forward(self, x):
        return self.model(x)


def outer():
    torch.manual_seed(0)
    return Outer()


def saved_delta(tmp_path, root_of):
    model = outer()
    delta = dh.attach(root_of(model), dh.LoRA(targets=["proj", "out"], r=2, init="random"))
    path = tmp_path / "delta.safetensors"
    delta.save(path)
    return path


def test_save_to_a_directory_names_it(tmp_path):
    delta = dh.attach(outer(), dh.LoRA(targets=["proj"], r=2))
    with pytest.raises(dh.DeltaFileError, match=rf"{tmp_path}.*is a directory.*delta.safetensors"):
        delta.save(tmp_path)
    assert os.listdir(tmp_path) == []


def test_save_into_a_missing_folder_names_it(tmp_path):
    delta = dh.attach(outer(), dh.LoRA(targets=["proj"], r=2))
    target = tmp_path / "no" / "such" / "d.safetensors"
    with pytest.raises(dh.DeltaFileError, match=r"folder .*such' does not exist.*makedirs"):
        delta.save(target)
    assert not (tmp_path / "no").exists()


def test_a_failed_write_names_the_path_and_leaves_no_temporary(tmp_path, monkeypatch):
    delta = dh.attach(outer(), dh.LoRA(targets=["proj"], r=2))
    target = tmp_path / "d.safetensors"
    target.write_bytes(b"the previous file")

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("deltahooks.io.save_file", disk_full)
    with pytest.raises(dh.DeltaFileError, match=rf"{target}.*No space left"):
        delta.save(target)
    assert os.listdir(tmp_path) == ["d.safetensors"]  # no temporary file left behind
    assert target.read_bytes() == b"the previous file"  # all or nothing


def test_saved_files_get_ordinary_permissions(tmp_path):
    delta = dh.attach(outer(), dh.LoRA(targets=["proj"], r=2))
    previous = os.umask(0o022)
    try:
        delta.save(tmp_path / "d.safetensors")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(os.stat(tmp_path / "d.safetensors").st_mode) == 0o644
    assert os.listdir(tmp_path) == ["d.safetensors"]


def test_save_overwrites_an_existing_file_whole(tmp_path):
    model = outer()
    path = tmp_path / "d.safetensors"
    first = dh.attach(model, dh.LoRA(targets=["proj"], r=2, init="random"), name="a")
    first.save(path)
    first.detach()
    second = dh.attach(model, dh.LoRA(targets=["out"], r=1, init="random"), name="b")
    second.save(path)
    with safe_open(str(path), framework="pt") as handle:
        assert sorted(handle.keys()) == ["model.out.lora_A", "model.out.lora_B"]


def test_loading_a_peft_directory_points_to_load_peft(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}))
    model = outer()
    before = snapshot(model)
    with pytest.raises(dh.DeltaFileError, match=r"PEFT adapter directory.*dh.load_peft"):
        dh.load(model, tmp_path)
    assert_restored(model, before)


def test_loading_a_plain_directory_lists_its_delta_files(tmp_path):
    saved_delta(tmp_path, lambda model: model)
    with pytest.raises(dh.DeltaFileError, match=r"is a directory.*\['delta.safetensors'\]"):
        dh.load(outer(), tmp_path)


def test_loading_into_the_inner_model_says_to_use_the_outer_one(tmp_path):
    path = saved_delta(tmp_path, lambda model: model)  # paths model.proj, model.out
    inner = outer().model
    before = snapshot(inner)
    with pytest.raises(dh.DeltaFileError, match=r"start with 'model\.'.*outer model"):
        dh.load(inner, path)
    assert_restored(inner, before)


def test_loading_into_the_outer_model_names_the_submodule(tmp_path):
    path = saved_delta(tmp_path, lambda model: model.model)  # paths proj, out
    model = outer()
    before = snapshot(model)
    with pytest.raises(dh.DeltaFileError, match=r"exist under 'model'.*get_submodule\('model'\)"):
        dh.load(model, path)
    assert_restored(model, before)
    dh.load(model.model, path)  # the advice works


def test_a_rank_above_full_rank_warns_with_the_numbers():
    model = outer()
    with pytest.warns(dh.DeltaWarning, match=r"rank 8 on 'model.out' exceeds the full rank 2"):
        dh.attach(model, dh.LoRA(targets=["out"], r=8))


def test_a_rank_within_full_rank_does_not_warn(recwarn):
    dh.attach(outer(), dh.LoRA(targets=["proj"], r=4))
    assert not [w for w in recwarn if issubclass(w.category, dh.DeltaWarning)]
