"""A delta file cannot make the loader allocate more than the file itself holds.

Headers that lie about ranks, widths or shapes are refused by comparing the plan (built on
the meta device) with the stored tensors' shapes before anything is allocated: each case
raises ``DeltaFileError`` while the process may grow by at most 50 MB, and leaves the model
bit-identical.
"""

from __future__ import annotations

import json
import struct

import pytest
import torch
from memory_limits import growth_limit
from model_checks import assert_restored, snapshot
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import deltahooks as dh

LIES = [2**40, 2**62, 2**64, 10**8, 20_000_000, -1, 0, 2.5, True, "8", None, [2], float("nan")]
ALLOWED_GROWTH = 50 * 2**20


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Embedding(10, 8), nn.Linear(8, 8), nn.Conv1d(8, 8, 1), nn.LayerNorm(8))


@pytest.fixture
def saved(tmp_path):
    model = make_model()
    delta = dh.attach(
        model,
        [
            dh.LoRA(targets=["0", "1", "2"], r=2, init="random", rank_pattern={"2": 1}),
            dh.Adapter(targets=["3"], bottleneck=4, hidden_size=8, init="random"),
        ],
    )
    path = tmp_path / "delta.safetensors"
    delta.save(path)
    return path


def rewrite_hyperparameter(path, out, part: int, key: str, value) -> str:
    with safe_open(str(path), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    header = json.loads(meta["delta"])
    target = header["parts"][part]["hyperparameters"]
    if isinstance(target.get(key), dict):  # a pattern: lie about the value of its entry
        target[key] = dict.fromkeys(target[key], value)
    else:
        target[key] = value
    save_file(tensors, str(out), metadata={**meta, "delta": json.dumps(header)})
    return str(out)


def assert_refused_cheaply(path):
    model = make_model()
    before = snapshot(model)
    with growth_limit(ALLOWED_GROWTH) as enforced, pytest.raises(dh.DeltaFileError):
        dh.load(model, path)
    assert_restored(model, before)
    assert dh.deltas(model) == {}
    return enforced


FIELDS = [(0, "r"), (0, "rank_pattern"), (1, "bottleneck"), (1, "hidden_size")]
CASES = [
    (part, key, lie)
    for part, key in FIELDS
    for lie in LIES
    if not (key == "hidden_size" and lie is None)  # None is honest: "read it from the module"
]


@pytest.mark.parametrize("part, key, lie", CASES, ids=[f"{k}={v!r}" for _, k, v in CASES])
def test_lying_sizes_are_refused_without_allocating(saved, tmp_path, part, key, lie):
    bad = rewrite_hyperparameter(saved, tmp_path / "lie.safetensors", part, key, lie)
    assert_refused_cheaply(bad)


@pytest.mark.parametrize("shape", [[2**40, 8], [10**8, 8], [2, 8, 10**6]])
def test_a_stored_tensor_claiming_a_huge_shape_is_refused(saved, tmp_path, shape):
    """The safetensors header itself lies: its shape does not fit the bytes behind it."""
    blob = saved.read_bytes()
    size = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8 : 8 + size])
    header["0.lora_A"]["shape"] = shape
    encoded = json.dumps(header).encode()
    bad = tmp_path / "shape.safetensors"
    bad.write_bytes(struct.pack("<Q", len(encoded)) + encoded + blob[8 + size :])
    assert_refused_cheaply(bad)


def test_an_honest_file_loads_under_the_same_limit(saved):
    """The limit is not what refuses the lies: an honest file loads within it."""
    model = make_model()
    with growth_limit(ALLOWED_GROWTH):
        delta = dh.load(model, saved)
    assert sorted(delta.state_dict()) == [
        "0.lora_A",
        "0.lora_B",
        "1.lora_A",
        "1.lora_B",
        "2.lora_A",
        "2.lora_B",
        "3.adapter_down",
        "3.adapter_down_bias",
        "3.adapter_up",
        "3.adapter_up_bias",
    ]


def test_the_memory_limit_is_real():
    """Without this, the tests above could pass on a guard that does nothing."""
    with growth_limit(ALLOWED_GROWTH) as enforced:
        if not enforced:
            pytest.skip("RLIMIT_DATA exists on Linux only")
        with pytest.raises(RuntimeError, match="allocate"):
            torch.empty(4 * ALLOWED_GROWTH, dtype=torch.uint8)
