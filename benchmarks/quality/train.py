"""The training runs: one (method, seed) run in a fresh interpreter (``--worker``), and the
loop over seeds and methods that starts them, interleaved, reusing ``--resume``'s records.

Why a fresh interpreter per run: peak memory of one run cannot leak into the next. Why
interleaved (seed 0: A B C D, seed 1: D C B A, ...): slow drift of a shared machine
spreads over all methods.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import deltahooks as dh
from deltahooks import demo

from .. import _timing as timing
from .data import load_task
from .methods import ADAPTER_BOTTLENECK, ALPHA, DELTA_ROWS, DROPOUT, HEAD, RANK

ROOT = Path(__file__).resolve().parents[2]  # where ``python -m benchmarks.quality`` runs
MIB = 1024 * 1024


def epochs_for(method: str, args: argparse.Namespace) -> float:
    return args.full_epochs if method == "full" else args.epochs


def prepare(method: str, model: nn.Module, steps: int) -> tuple[nn.Module, Any, dict[str, Any]]:
    """Set ``model`` up for ``method`` trained for ``steps`` steps; return the model to
    train, a saver and keyword arguments for ``demo.train`` (the method's loop hooks).

    The saver writes what this method would ship into a folder and returns its path.
    """
    if method == "full":

        def save_full(folder: Path) -> Path:
            from safetensors.torch import save_file

            path = folder / "model.safetensors"
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
            return path

        return model, save_full, {}
    if method == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(
            r=RANK,
            lora_alpha=ALPHA,
            lora_dropout=DROPOUT,
            target_modules=demo.LORA_TARGETS,
            modules_to_save=HEAD,
        )
        peft_model = get_peft_model(model, config)

        def save_peft(folder: Path) -> Path:
            peft_model.save_pretrained(str(folder))
            return folder / "adapter_model.safetensors"

        return peft_model, save_peft, {}
    specs: list[dh.DeltaSpec] = [dh.Full(targets=HEAD)]
    if method == "lora":
        specs.insert(0, dh.LoRA(targets=demo.LORA_TARGETS, r=RANK, alpha=ALPHA, dropout=DROPOUT))
    if method == "adapter":  # Houlsby placement: after the attention and the FFN output layers
        specs.insert(0, dh.Adapter(targets=["output.dense"], bottleneck=ADAPTER_BOTTLENECK))
    if method in DELTA_ROWS:
        specs[:0] = DELTA_ROWS[method].specs(steps)
    delta = dh.attach(model, specs)
    loop = DELTA_ROWS[method].loop if method in DELTA_ROWS else None

    def save_delta(folder: Path) -> Path:
        path = folder / "delta.safetensors"
        delta.save(str(path))
        return path

    return model, save_delta, (loop(delta) if loop else {})


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """One (method, seed) run: set up, train (peak RSS measured), evaluate, save.

    Every method imports the same libraries before its baseline reading, and the
    peak-RSS watermark is reset after setup, so the memory figure is what training
    itself adds (activations, gradients, AdamW state) over the resident model.
    """
    import peft  # noqa: F401  (same imports for every method)

    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    method, seed = args.worker, args.seed
    task = load_task(seed)  # seeds torch: head init, then the delta's init
    epochs = epochs_for(method, args)
    steps = len(demo.batches(len(task.train_set), epochs, seed))
    model, save, loop = prepare(method, task.model, steps)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)

    gc.collect()
    before = timing.current_rss_bytes()
    reset = timing.reset_peak_rss()
    seconds = demo.train(model, task.train_set, epochs, args.worker_lr, seed, **loop)
    peak = timing.peak_rss_bytes()
    accuracy, _ = demo.predict(model, task.test_set)
    with tempfile.TemporaryDirectory() as folder:
        file_bytes = save(Path(folder)).stat().st_size
    return {
        "method": method,
        "seed": seed,
        "accuracy": accuracy,
        "seconds": seconds,
        "rss_before": before,
        "rss_peak": peak,
        "peak_reset": reset,
        "trainable": trainable,
        "base_params": task.base_params,
        "file_bytes": file_bytes,
        **task.sizes,
        "majority": task.majority,
    }


def run_child(method: str, seed: int, args: argparse.Namespace) -> tuple[dict[str, Any], float]:
    """Run one worker in a fresh interpreter; return its result and others' CPU share."""
    command = [
        sys.executable,
        "-m",
        "benchmarks.quality",
        "--worker",
        method,
        "--seed",
        str(seed),
        "--worker-lr",
        repr(args.rates[method]),
        "--epochs",
        repr(args.epochs),
        "--full-epochs",
        repr(args.full_epochs),
        "--threads",
        str(args.threads),
    ]
    env = {**os.environ, "TQDM_DISABLE": "1", "HF_HUB_OFFLINE": "1"}
    with timing.Contention() as busy:
        done = subprocess.run(
            command, capture_output=True, text=True, check=False, env=env, cwd=ROOT
        )
    if done.returncode != 0:
        raise RuntimeError(f"worker {method} seed {seed} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1]), busy.share or 0.0


def run_key(method: str, seed: int, args: argparse.Namespace) -> str:
    """What makes two runs the same run, for ``--resume``."""
    return (
        f"{method} seed={seed} lr={args.rates[method]!r} "
        f"epochs={epochs_for(method, args)!r} threads={args.threads}"
    )


def recorded_runs(path: Path | None) -> dict[str, dict[str, Any]]:
    """The runs already in a ``--resume`` file, by :func:`run_key` (last one wins)."""
    if path is None or not path.exists():
        return {}
    entries = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return {entry["key"]: entry for entry in entries}


@dataclass
class Runs:
    """What :func:`run_all` gathered: each method's worker results, in seed order, and how
    the runs went (others' CPU share per run, wall times, how many were reused)."""

    results: dict[str, list[dict[str, Any]]]
    busy: list[float] = field(default_factory=list)
    walls: list[float] = field(default_factory=list)
    reused: int = 0
    wall: float = 0.0


def run_all(args: argparse.Namespace) -> Runs:
    """Every (method, seed) run, interleaved (seed 0: A B C D, seed 1: D C B A, ...), each in
    a fresh interpreter or reused from ``--resume``'s records; progress printed per run."""
    started = time.perf_counter()
    runs = Runs({m: [] for m in args.methods})
    total = args.seeds * len(args.methods)
    print(
        f"{total} runs: methods {', '.join(args.methods)} x {args.seeds} seed(s); "
        f"epochs {args.epochs:g} (full {args.full_epochs:g}); {args.threads} threads"
    )
    recorded = recorded_runs(args.resume)
    for seed in range(args.seeds):
        order = args.methods if seed % 2 == 0 else args.methods[::-1]
        for method in order:
            key = run_key(method, seed, args)
            if key in recorded:
                entry = recorded[key]
                runs.reused += 1
            else:
                tic = time.perf_counter()
                result, share = run_child(method, seed, args)
                entry = {
                    "key": key,
                    "result": result,
                    "share": share,
                    "wall": time.perf_counter() - tic,
                }
                if args.resume is not None:
                    with args.resume.open("a") as log:
                        log.write(json.dumps(entry) + "\n")
            result, share = entry["result"], entry["share"]
            runs.walls.append(entry["wall"])
            runs.results[method].append(result)
            runs.busy.append(share)
            growth = (result["rss_peak"] - result["rss_before"]) / MIB
            print(
                f"  [{sum(len(r) for r in runs.results.values())}/{total}] {method:<4} seed {seed}: "
                f"accuracy {result['accuracy']:.3f}, train {result['seconds']:.1f} s, "
                f"+{growth:.0f} MiB, others' CPU {share * 100:.0f}%",
                flush=True,
            )
    # with reused runs, the wall time is that of the runs themselves, whenever they ran
    runs.wall = sum(runs.walls) if runs.reused else time.perf_counter() - started
    return runs
