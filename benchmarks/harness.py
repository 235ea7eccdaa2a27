"""The machinery every comparison with PEFT shares: the Llama workload, interleaved timing
phases, the checks' helpers and the memory workers.

Why this shape: a claim such as "forward is 3 % faster than PEFT" is smaller than the drift
of a shared machine over a few minutes, so both sides run alternately (A B, B A, ...) on
identical copies of one randomly initialised Llama, each figure is the median of per-round
ratios, and both sides carry the *same* non-identity values, checked equal before a time is
reported. Peak memory comes from fresh interpreters (``python -m benchmarks
--memory-worker METHOD SIDE``), one side each, so import and setup costs do not leak.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn

from . import _timing as timing
from .report import Figure

ROOT = Path(__file__).resolve().parents[1]  # where ``python -m benchmarks`` finds the package
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 1024 * 1024

# (reference, --quick); an explicit flag beats both
MODEL_SHAPES: dict[str, tuple[int, int]] = {  # the Llama and its batch
    "hidden": (512, 64),
    "layers": (8, 2),
    "intermediate": (1376, 172),
    "heads": (8, 4),
    "vocab": (32000, 1000),
    "batch": (4, 2),
    "seq": (128, 32),
}
SHAPES: dict[str, tuple[int, int]] = {
    **MODEL_SHAPES,
    "rounds": (7, 2),
    "warmup": (2, 1),
    "memory_steps": (3, 2),
}
BUSY_WARNING = 0.10  # others' share of the CPUs above which timings are flagged

Phase = tuple[dict[str, list[float]], float | None]  # times per case, others' CPU share


# ------------------------------------------------------------------ command line
def base_parser(description: str) -> argparse.ArgumentParser:
    """Device, dtype, threads and ``--quick``; then come a script's own flags and shapes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: smoke run")
    return parser


def add_shape_flags(parser: argparse.ArgumentParser, shapes: Mapping[str, tuple[int, int]]) -> None:
    """One flag per workload shape (``--memory-steps`` for ``memory_steps``); see fill_shapes."""
    for name, (ref, quick) in shapes.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"default {ref} ({quick} quick)")


def fill_shapes(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    shapes: Mapping[str, tuple[int, int]],
    small: Mapping[str, int] | None = None,
) -> argparse.Namespace:
    """Shapes not given on the command line: ``--quick``'s, ``--small``'s or the reference."""
    for name, (ref, quick) in shapes.items():
        if getattr(args, name) is None:
            if small is not None and args.small:
                ref = small.get(name, ref)
            setattr(args, name, quick if args.quick else ref)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    return args


# ---------------------------------------------------------------------- workload
def build_base(
    args: argparse.Namespace, device: torch.device, dtype: torch.dtype, extra_positions: int = 0
) -> nn.Module:
    """A randomly initialised Llama: the shape matters for speed, not the weights.

    ``extra_positions``: tokens a method puts in front of the ``args.seq`` real ones.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq + extra_positions),
        use_cache=False,  # no KV-cache bookkeeping: it is identical for both sides anyway
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return model.eval()


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def make_batch(args: argparse.Namespace, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=generator)
    return ids.to(device)


def forward_fn(model: nn.Module, ids: torch.Tensor) -> Callable[[], torch.Tensor]:
    @torch.no_grad()
    def run() -> torch.Tensor:
        return model(input_ids=ids).logits

    return run


def train_fn(
    model: nn.Module,
    ids: torch.Tensor,
    losses: list[torch.Tensor],
    weight_decay: float = 0.01,
    loss_fn: Callable[[torch.Tensor], torch.Tensor] | None = None,
    after_step: Callable[[], None] | None = None,
) -> Callable[[], None]:
    """One AdamW step on the causal-LM loss; the loss is kept, not synced, for checks.

    The method benchmarks pass ``weight_decay=0``: decay would pull our Δ to 0 but PEFT's
    trained copies (LN tuning, say) to 0 too, not to the base, so the sides would differ.
    ``loss_fn(ids)`` replaces the LM loss; ``after_step`` runs between step and zero_grad.
    """
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4, weight_decay=weight_decay)

    def run() -> None:
        loss = model(input_ids=ids, labels=ids).loss if loss_fn is None else loss_fn(ids)
        loss.backward()
        optimizer.step()
        if after_step is not None:
            after_step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return run


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ------------------------------------------------------------------------- timing
def timed_phase(
    title: str,
    cases: dict[str, Callable[[], object]],
    args: argparse.Namespace,
    device: torch.device,
) -> Phase:
    """Interleave ``cases``, print their times and how busy the rest of the machine was."""
    with timing.Contention() as busy:
        times = timing.interleave(cases, rounds=args.rounds, warmup=args.warmup, device=device)
    print(f"\n{title}; {busy.describe()}")
    if busy.share is not None and busy.share > BUSY_WARNING:
        print("  WARNING: the machine was busy; ratios are unreliable, compare 'best' too")
        free = (os.cpu_count() or 1) * (1 - busy.share)
        if device.type == "cpu" and args.threads > 1 and free < args.threads:
            print(
                f"  WARNING: ~{free:.1f} CPUs were free for {args.threads} torch threads; "
                "OpenMP then stalls on every op (--threads 1 degrades more gracefully)"
            )
    for name, values in times.items():
        ms = [v * 1e3 for v in values]
        print(
            f"  {name:<14} median {timing.median(ms):9.2f} ms   min {min(ms):9.2f}   "
            f"max {max(ms):9.2f}   +/-{timing.spread(values) * 100:4.1f}%"
        )
    return times, busy.share


def timed_figure(name: str, phase: Phase, ours: str, other: str, goal: float | None) -> Figure:
    """Medians in ms and the paired ratio; noise, best-time ratio and load as notes."""
    times, busy = phase
    noise = "/".join(f"{timing.spread(times[n]) * 100:.1f}" for n in (ours, other))
    best = timing.ratio_of_minima(times[ours], times[other])
    load = "" if busy is None else f", others' CPU use {busy * 100:.0f}%"
    return Figure(
        name,
        timing.median(times[ours]) * 1e3,
        timing.median(times[other]) * 1e3,
        timing.paired_ratio(times[ours], times[other]),
        goal,
        "ms",
        f"best {best:.3f}, noise +/-{noise}%{load}",
    )


def timed_training(
    title: str,
    models: dict[str, nn.Module],
    make_step: Callable[[str, nn.Module, list[torch.Tensor]], Callable[[], None]],
    fwd: Mapping[str, Callable[[], torch.Tensor]],
    args: argparse.Namespace,
    device: torch.device,
    check: Callable[[str], None],
) -> tuple[Phase, dict[str, torch.Tensor]]:
    """Interleave one train step per side (``make_step(side, model, losses)``), then check
    that the losses and the logits after training agree; returns the phase and the logits."""
    losses: dict[str, list[torch.Tensor]] = {side: [] for side in models}
    for model in models.values():
        model.train()
    steps = {side: make_step(side, model, losses[side]) for side, model in models.items()}
    phase = timed_phase(title, steps, args, device)
    for model in models.values():
        model.eval()
    loss_gap = max(abs(a.item() - b.item()) for a, b in zip(losses["ours"], losses["peft"]))
    after = {side: fwd[side]() for side in models}
    check(
        f"after {len(losses['ours'])} train steps: max |loss ours - PEFT| = {loss_gap:.3g}, "
        f"max |logits ours - PEFT| = {max_diff(after['ours'], after['peft']):.3g}"
    )
    return phase, after


def profile_forwards(cases: dict[str, Callable[[], object]], calls: int, top: int = 15) -> None:
    """Per-op self CPU time of ``calls`` forwards per side, and where they differ most."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    per_side: dict[str, dict[str, tuple[int, float]]] = {}
    for name, fn in cases.items():
        fn()
        with profile(activities=activities) as prof:
            for _ in range(calls):
                fn()
        averages = prof.key_averages()
        per_side[name] = {
            e.key: (e.count // calls, e.self_cpu_time_total / calls / 1e3) for e in averages
        }
        print(f"\nprofile: {name}, per forward (top {top} by self CPU time)")
        print(averages.table(sort_by="self_cpu_time_total", row_limit=top))
    if {"ours", "peft"} <= per_side.keys():
        ours, peft_ops = per_side["ours"], per_side["peft"]
        keys = sorted(
            ours.keys() | peft_ops.keys(),
            key=lambda k: -abs(ours.get(k, (0, 0.0))[1] - peft_ops.get(k, (0, 0.0))[1]),
        )
        print("\nprofile diff per forward: op, calls ours/PEFT, self CPU ms ours/PEFT, delta")
        for key in keys[:top]:
            (oc, ot), (pc, pt) = ours.get(key, (0, 0.0)), peft_ops.get(key, (0, 0.0))
            print(f"  {key:<34} {oc:6d}/{pc:<6d} {ot:9.2f}/{pt:<9.2f} {ot - pt:+8.2f} ms")


# ------------------------------------------------------------------------ memory
def print_training_peak(step: Callable[[], None], device: torch.device, steps: int) -> None:
    """In a memory worker: run ``steps`` training steps, print the memory before and the peak.

    The worker has imported both libraries first, so import footprint does not count.
    The peak is reset after setup, so it covers the training steps (activations, grads,
    AdamW state) on top of the resident model, not model construction.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = timing.current_rss_bytes()
        if not timing.reset_peak_rss():
            print("warning: cannot reset the peak-RSS watermark", file=sys.stderr)
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = timing.peak_rss_bytes()
    print(json.dumps({"before": before, "peak": peak}))


def measure_memory(argv: list[str], method: str) -> dict[str, list[dict[str, int]]]:
    """Each side of ``method`` twice, interleaved (ours, PEFT, PEFT, ours), each time in a
    fresh ``python -m benchmarks *argv --memory-worker METHOD SIDE``."""
    results: dict[str, list[dict[str, int]]] = {"ours": [], "peft": []}
    for side in ["ours", "peft", "peft", "ours"]:
        command = [sys.executable, "-m", "benchmarks", *argv, "--memory-worker", method, side]
        done = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {method} {side} failed:\n{done.stderr[-3000:]}")
        results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def memory_runs_note(mem: dict[str, list[dict[str, int]]]) -> str:
    """``runs 512, 515 / 530, 529 MiB``: every worker's peak, ours first."""
    return (
        "runs "
        + " / ".join(", ".join(f"{r['peak'] / MIB:.0f}" for r in mem[s]) for s in mem)
        + " MiB"
    )


def memory_kind(device: torch.device) -> str:
    """What a memory figure reads: CUDA's allocator on a GPU, the process's RSS on CPU."""
    return "CUDA allocated" if device.type == "cuda" else "RSS"


def peak_figure(name: str, mem: dict[str, list[dict[str, int]]], goal: float | None) -> Figure:
    """Median peak of each side's workers, ours / PEFT; every run's peak as the note."""
    peak = {side: timing.median([r["peak"] / MIB for r in runs]) for side, runs in mem.items()}
    ratio = peak["ours"] / peak["peft"]
    return Figure(name, peak["ours"], peak["peft"], ratio, goal, "MiB", memory_runs_note(mem))
