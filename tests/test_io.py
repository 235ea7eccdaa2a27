"""Delta files: what is written, and loading that refuses what does not fit, changing nothing."""

from __future__ import annotations

import json

import pytest
import torch
from model_checks import assert_restored, snapshot
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import deltahooks as dh


def make_model(width=8):
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, width), nn.ReLU(), nn.Linear(width, 3))


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    delta = dh.attach(
        model, [dh.LoRA(targets=nn.Linear, r=2, init="random"), dh.Full(targets=["2"])]
    )
    path = tmp_path / "delta.safetensors"
    delta.save(path)
    return path, delta


def test_file_holds_only_the_delta_and_its_spec(saved):
    path, delta = saved
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        meta = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in keys}
    assert sorted(keys) == sorted(delta.state_dict())
    for key, value in delta.state_dict().items():
        assert torch.equal(tensors[key], value)
    assert meta["format"] == "deltahooks.delta" and meta["format_version"] == "1"
    assert meta["deltahooks_version"] == dh.__version__
    header = json.loads(meta["delta"])
    lora, full = header["parts"]
    assert lora["method"] == "lora" and lora["paths"] == ["0", "2"]
    assert lora["hyperparameters"]["r"] == 2
    assert lora["targets"].startswith("type:torch.nn")
    assert full["paths"] == ["2"] and header["shapes"]["0.lora_A"] == [2, 4]
    assert path.read_bytes()[8:9] == b"{"  # a safetensors JSON header, not a pickle


def test_load_reproduces_and_info_describes(saved, capsys):
    path, delta = saved
    fresh = make_model()
    loaded = dh.load(fresh, path, name="copy")
    assert loaded.name == "copy"
    for key, value in delta.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    from deltahooks.cli import main

    assert main(["info", str(path)]) == 0
    out = capsys.readouterr().out
    assert "lora" in out and "full" in out and "2 modules" in out


def rewrite(path, out, *, tensors=None, meta=None):
    with safe_open(str(path), framework="pt") as handle:
        t = {k: handle.get_tensor(k) for k in handle.keys()}
        m = handle.metadata()
    if tensors:
        t = tensors(t)
    if meta:
        m = meta(m)
    save_file(t, str(out), metadata=m)
    return out


def with_header(change):
    def edit(meta):
        header = json.loads(meta["delta"])
        change(header)
        return {**meta, "delta": json.dumps(header)}

    return edit


BAD_FILES = [
    ("missing", lambda p, d: d / "nope.safetensors", "does not exist"),
    (
        "garbage",
        lambda p, d: (d / "g.safetensors").write_bytes(b"\x00" * 40) and d / "g.safetensors",
        "not a readable",
    ),
    (
        "truncated",
        lambda p, d: (d / "t.safetensors").write_bytes(p.read_bytes()[:60]) and d / "t.safetensors",
        "not a readable",
    ),
    (
        "header too large",
        lambda p, d: (
            (d / "h.safetensors").write_bytes((2**40).to_bytes(8, "little") + b"{}")
            and d / "h.safetensors"
        ),
        "header too large",
    ),
    (
        "no metadata",
        lambda p, d: rewrite(p, d / "m.safetensors", meta=lambda m: {"x": "y"}),
        "no deltahooks metadata",
    ),
    (
        "newer format",
        lambda p, d: rewrite(p, d / "v.safetensors", meta=lambda m: {**m, "format_version": "99"}),
        "upgrade deltahooks",
    ),
    (
        "bad json",
        lambda p, d: rewrite(p, d / "j.safetensors", meta=lambda m: {**m, "delta": "{"}),
        "ill-formed",
    ),
    (
        "unknown method",
        lambda p, d: rewrite(
            p, d / "u.safetensors", meta=with_header(lambda h: h["parts"][0].update(method="magic"))
        ),
        "magic",
    ),
    (
        "absent path",
        lambda p, d: rewrite(
            p, d / "a.safetensors", meta=with_header(lambda h: h["parts"][0].update(paths=["9"]))
        ),
        "another model",
    ),
    (
        "missing tensor",
        lambda p, d: rewrite(
            p,
            d / "x.safetensors",
            tensors=lambda t: {k: v for k, v in t.items() if k != "0.lora_A"},
        ),
        "missing",
    ),
    (
        "extra tensor",
        lambda p, d: rewrite(
            p, d / "e.safetensors", tensors=lambda t: {**t, "0.zzz": torch.ones(1)}
        ),
        "extra",
    ),
    (
        "wrong shape",
        lambda p, d: rewrite(
            p, d / "s.safetensors", tensors=lambda t: {**t, "0.lora_A": torch.ones(3, 4)}
        ),
        r"'0.lora_A' has shape \[3, 4\].*\[2, 4\]",
    ),
    (
        "wrong dtype",
        lambda p, d: rewrite(
            p,
            d / "d.safetensors",
            tensors=lambda t: {**t, "0.lora_A": torch.ones(2, 4, dtype=torch.int64)},
        ),
        "dtype",
    ),
    (
        "nan",
        lambda p, d: rewrite(
            p,
            d / "n.safetensors",
            tensors=lambda t: {**t, "0.lora_B": torch.full((8, 2), float("nan"))},
        ),
        "allow_nonfinite",
    ),
]


@pytest.mark.parametrize("case, make, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_files_raise_and_change_nothing(saved, tmp_path, case, make, message):
    path, _ = saved
    bad = make(path, tmp_path)
    model = make_model()
    before = snapshot(model)
    with pytest.raises(dh.DeltaFileError, match=message):
        dh.load(model, bad)
    assert_restored(model, before)
    assert dh.deltas(model) == {}


def test_a_model_of_another_width_is_refused_naming_the_key(saved):
    path, _ = saved
    model = make_model(width=16)
    before = snapshot(model)
    with pytest.raises(dh.DeltaFileError, match=r"0\.lora_B.*\[8, 2\].*\[16, 2\]"):
        dh.load(model, path)
    assert_restored(model, before)


def test_nonfinite_values_load_when_allowed(saved, tmp_path):
    path, _ = saved
    bad = rewrite(
        path,
        tmp_path / "n.safetensors",
        tensors=lambda t: {**t, "0.lora_B": torch.full((8, 2), float("inf"))},
    )
    delta = dh.load(make_model(), bad, allow_nonfinite=True)
    assert torch.isinf(delta.state_dict()["0.lora_B"]).all()
