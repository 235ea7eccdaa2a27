"""LoRA on a 4-bit (bitsandbytes NF4) Llama against PEFT's QLoRA: the base, the measure and
the environment lines of the ``qlora`` row.

Both sides load the same checkpoint (a random Llama saved once to a temporary folder) with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``, compute dtype
``--dtype``, and carry the same LoRA factors (PEFT's are copied into ours). Models stay in
training mode throughout: on CPU, bitsandbytes repacks NF4 weights for inference at the
first eval forward, after which the layer no longer trains (its limitation, on both sides).

Figures: forward (no_grad) and train step, ours / PEFT [<= 1.00]; peak memory while
training and memory after attach, ours / PEFT, each side in a fresh process, twice (CPU:
RSS, CUDA: ``max_memory_allocated``).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

import deltahooks as dh

from . import _timing as timing
from .harness import (
    DTYPES,
    MIB,
    build_base,
    forward_fn,
    make_batch,
    max_diff,
    measure_memory,
    memory_kind,
    timed_figure,
    timed_phase,
    train_fn,
)
from .report import Figure, device_name
from .rows import Benchmark, Method, Result

# (reference, --quick); NF4 packs blocks of 64, so every width is a multiple of 64
SHAPES = {
    "hidden": (512, 128),
    "layers": (4, 2),
    "intermediate": (1408, 256),
    "heads": (8, 4),
    "vocab": (8000, 1000),
    "batch": (4, 2),
    "seq": (128, 32),
    "rounds": (7, 2),
    "warmup": (1, 1),
    "memory_steps": (2, 1),
}
GOAL = 1.00


@contextmanager
def checkpoint(args: argparse.Namespace) -> Iterator[None]:
    """Save the random Llama once; both sides (and the memory workers) load it in NF4."""
    with tempfile.TemporaryDirectory() as folder:
        build_base(args, torch.device("cpu"), torch.float32).save_pretrained(folder)
        args.checkpoint = folder
        yield None


def load_nf4(args: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = DTYPES[args.dtype]
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, quantization_config=config, device_map={"": args.device}, dtype=dtype
    )
    return model.train()


def nf4_lora(
    benchmark: Benchmark, method: Method, base: None, args: argparse.Namespace, argv: list[str]
) -> Result:
    """Forward and train step interleaved, then each side's memory in fresh processes."""
    device = torch.device(args.device)
    ours = load_nf4(args)
    delta, peft_model, copied = method.pair(ours, load_nf4(args), args)
    ids = make_batch(args, device)
    fwd = {"ours": forward_fn(ours, ids), "peft": forward_fn(peft_model, ids)}
    out = {name: fn() for name, fn in fwd.items()}
    checks = [
        f"{copied} LoRA factors copied from PEFT; max |logits ours - PEFT| = "
        f"{max_diff(out['ours'], out['peft']):.3g}",
    ]
    print(f"check: {checks[0]}")
    t_fwd = timed_phase("QLoRA forward (no_grad)", fwd, args, device)
    losses: dict[str, list[torch.Tensor]] = {"ours": [], "peft": []}
    train = {
        side: train_fn(m, ids, losses[side]) for side, m in [("ours", ours), ("peft", peft_model)]
    }
    t_train = timed_phase("QLoRA train step (fwd + bwd + AdamW)", train, args, device)
    gap = max(abs(a.item() - b.item()) for a, b in zip(losses["ours"], losses["peft"]))
    checks.append(f"after {len(losses['ours'])} train steps: max |loss ours - PEFT| = {gap:.3g}")
    print(f"check: {checks[-1]}")
    figures = [
        timed_figure("QLoRA forward, ours / PEFT", t_fwd, "ours", "peft", GOAL),
        timed_figure("QLoRA train step, ours / PEFT", t_train, "ours", "peft", GOAL),
    ]
    del peft_model, ours, delta, train
    if args.no_memory:
        return figures, checks
    mem = measure_memory([*argv, "--checkpoint", args.checkpoint], method.name)
    what_memory = memory_kind(device)
    for key, what in [
        ("peak", f"peak {what_memory} in training"),
        ("before", f"{what_memory} after attach"),
    ]:
        value = {side: timing.median([r[key] / MIB for r in runs]) for side, runs in mem.items()}
        runs = " / ".join(", ".join(f"{r[key] / MIB:.0f}" for r in mem[side]) for side in mem)
        figures.append(
            Figure(
                f"NF4 base + LoRA, {what}, ours / PEFT",
                value["ours"],
                value["peft"],
                value["ours"] / value["peft"],
                GOAL if key == "peak" else None,
                "MiB",
                f"runs ours / PEFT: {runs} MiB",
            )
        )
    return figures, checks


def environment(args: argparse.Namespace, device: torch.device, workload: str) -> list[str]:
    """The shared lines, with bitsandbytes' version and the NF4 workload."""
    import bitsandbytes
    import peft
    import transformers

    return [
        f"date: {timing.utc_now()}",
        f"device: {args.device} - {device_name(device)}; torch threads: {args.threads}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"bitsandbytes {bitsandbytes.__version__}, deltahooks {dh.__version__} "
        f"({timing.git_commit()})",
        f"workload: Llama hidden={args.hidden} layers={args.layers} intermediate="
        f"{args.intermediate} heads={args.heads} vocab={args.vocab} in NF4 (compute {args.dtype}), "
        f"batch {args.batch} x {args.seq} tokens; {workload}",
        f"timing: {args.warmup} warm-up + {args.rounds} interleaved rounds; ratio = median of "
        "per-round ratios",
    ]
