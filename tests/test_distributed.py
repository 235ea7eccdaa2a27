"""DDP and FSDP2 training with a delta, two gloo processes on CPU: the saved file equals
the one a single process training on the whole batch writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

import deltahooks as dh

pytest.importorskip("transformers")
if not torch.distributed.is_available():  # pragma: no cover
    pytest.skip("torch without distributed", allow_module_level=True)

SCRIPT = os.path.join(os.path.dirname(__file__), "distributed", "train_and_save.py")


def run(mode, out, processes):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    if processes == 1:
        command = [sys.executable, SCRIPT, mode, str(out)]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            SCRIPT,
            mode,
            str(out),
        ]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def tensors(path):
    with safe_open(str(path), framework="pt") as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, handle.metadata()


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    out = tmp_path_factory.mktemp("single") / "delta.safetensors"
    run("single", out, 1)
    return out


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_save_the_file_one_process_saves(mode, single, tmp_path):
    out = tmp_path / "delta.safetensors"
    run(mode, out, 2)
    want, want_meta = tensors(single)
    got, got_meta = tensors(out)
    assert got_meta == want_meta and got.keys() == want.keys()
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-5, atol=1e-6)
    assert not [p for p in tmp_path.iterdir() if p.name != "delta.safetensors"]


def test_the_runs_trained_the_delta(single):
    """The script's start, rebuilt here: three SGD steps moved every tensor away from it."""
    from tiny_models import llama

    torch.manual_seed(0)
    model, _ = llama()
    start = dh.attach(model, dh.LoRA(targets=["q_proj", "v_proj"], r=2, init="random"))
    trained, _ = tensors(single)
    assert trained.keys() == start.state_dict().keys()
    for key, tensor in start.state_dict().items():
        assert not torch.allclose(trained[key], tensor), key
