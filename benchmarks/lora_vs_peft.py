"""deltahooks LoRA vs PEFT LoRA: same model, same LoRA weights, one process, interleaved.

Why this shape: a release claim such as "forward is 3 % faster than PEFT" is smaller than
the drift of a shared machine over a few minutes, so both sides run alternately (A B, B A,
...) on two identical copies of one randomly initialised Llama, and each figure is the
median of per-round ratios. Both copies carry the *same* non-zero LoRA factors and the
script prints how far their outputs differ, so the timings compare equal work.

Figures (goals in brackets):
  1. LoRA forward, eval + no_grad, ours / PEFT            [<= 0.97]
  2. LoRA train step (LM loss fwd + bwd + AdamW), ours / PEFT  [<= 0.95]
  3. merged forward, ours / frozen base without any delta  [<= 1.01]
     (PEFT merged / base printed for reference)
  4. peak memory while training, ours / PEFT, each in a fresh subprocess  [<= 1.00]
     (CPU: peak RSS; CUDA: peak ``torch.cuda.max_memory_allocated``)

Usage:
    python benchmarks/lora_vs_peft.py            # reference workload, a few minutes on 2 cores
    python benchmarks/lora_vs_peft.py --quick    # tiny smoke run
    python benchmarks/lora_vs_peft.py --device cuda --dtype bfloat16
    python benchmarks/lora_vs_peft.py --profile 3  # + torch.profiler op table, ours vs PEFT

The markdown table is also written to ``benchmarks/out/lora_vs_peft.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import _timing as timing  # benchmarks/ is sys.path[0] when run as a script
import torch
from torch import nn

try:
    import deltahooks as dh
except ModuleNotFoundError:  # a checkout without `pip install -e .`: use the package beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import deltahooks as dh

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "lora_vs_peft.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MIB = 1024 * 1024

# (reference, --quick); an explicit flag beats both
SHAPES: dict[str, tuple[int, int]] = {
    "hidden": (512, 64),
    "layers": (8, 2),
    "intermediate": (1376, 172),
    "heads": (8, 4),
    "vocab": (32000, 1000),
    "batch": (4, 2),
    "seq": (128, 32),
    "rounds": (7, 2),
    "warmup": (2, 1),
    "memory_steps": (3, 2),
}

GOALS = {"forward": 0.97, "train": 0.95, "merged": 1.01, "memory": 1.00}
BUSY_WARNING = 0.10  # others' share of the CPUs above which timings are flagged


# --------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: smoke run")
    for name, (ref, quick) in SHAPES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"default {ref} ({quick} quick)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess figure")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N forwards of each side"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table path")
    parser.add_argument("--memory-worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name, (ref, quick) in SHAPES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else ref)
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    return args


def build_base(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A randomly initialised Llama: the shape matters for speed, not the weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=args.hidden,
        num_hidden_layers=args.layers,
        intermediate_size=args.intermediate,
        num_attention_heads=args.heads,
        num_key_value_heads=args.heads,
        vocab_size=args.vocab,
        max_position_embeddings=max(2048, args.seq),
        use_cache=False,  # no KV-cache bookkeeping: it is identical for both sides anyway
        attn_implementation="sdpa",
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    return model.eval()


def attach_ours(model: nn.Module, args: argparse.Namespace) -> dh.Delta:
    """Both factors random (``init="random"``): a zero B would hide a wrong B path."""
    spec = dh.LoRA(targets=TARGETS, r=args.rank, alpha=args.alpha, dropout=0.0, init="random")
    delta = dh.attach(model, spec)
    with torch.no_grad():  # keep the delta small next to W, as after real training
        for name, tensor in delta.named_parameters():
            if name.endswith("lora_B"):
                tensor.mul_(0.1)
    return delta


def attach_peft(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """PEFT's model, adapters kept in the model dtype (no fp32 upcast) to match ours."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=0.0, target_modules=list(TARGETS)
    )
    return get_peft_model(model, config, autocast_adapter_dtype=False)


@torch.no_grad()
def copy_lora_into_peft(delta: dh.Delta, peft_model: nn.Module) -> int:
    """Give PEFT exactly our factors; both use PEFT's layouts (A: r x in, B: out x r)."""
    inner = peft_model.base_model.model
    count = 0
    for key, tensor in delta.state_dict().items():
        path, local = key.rsplit(".", 1)  # "model.layers.0.self_attn.q_proj", "lora_A"
        getattr(inner.get_submodule(path), local)["default"].weight.copy_(tensor)
        count += 1
    return count


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


def train_fn(model: nn.Module, ids: torch.Tensor, losses: list[torch.Tensor]) -> Callable[[], None]:
    """One optimiser step on the causal-LM loss; the loss is kept, not synced, for checks."""
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-4)

    def run() -> None:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return run


@torch.no_grad()
def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------- reporting
@dataclass
class Figure:
    """One row of the result table: ``ours`` against ``other`` (PEFT or the base)."""

    name: str
    ours: float
    other: float
    ratio: float
    goal: float | None
    unit: str
    notes: str = ""

    @property
    def verdict(self) -> str:
        if self.goal is None:
            return "info"
        # judged on the printed (3-decimal) ratio, so the table never reads "0.950 FAIL"
        return "PASS" if round(self.ratio, 3) <= self.goal else "FAIL"

    def cells(self) -> list[str]:
        goal = "-" if self.goal is None else f"<= {self.goal:.2f}"
        return [
            self.name,
            f"{self.ours:.1f} {self.unit}",
            f"{self.other:.1f} {self.unit}",
            f"{self.ratio:.3f}",
            goal,
            self.verdict,
        ]


def markdown_table(figures: list[Figure]) -> str:
    header = ["figure", "ours", "PEFT/base", "ratio", "goal", "PASS/FAIL"]
    rows = [header, ["---"] * len(header), *(f.cells() for f in figures)]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} logical CPUs)"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} logical CPUs)"


def environment(args: argparse.Namespace, device: torch.device) -> list[str]:
    import peft
    import transformers

    commit, now = timing.git_commit(), timing.utc_now()
    return [
        f"date: {now}",
        f"device: {device} - {device_name(device)}; torch threads: {torch.get_num_threads()}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"deltahooks {dh.__version__} ({commit})",
        f"workload: Llama hidden={args.hidden} layers={args.layers} "
        f"intermediate={args.intermediate} heads={args.heads} vocab={args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens, {args.dtype}; LoRA r={args.rank} "
        f"alpha={args.alpha:g} dropout=0 on {','.join(TARGETS)}",
        f"timing: {args.warmup} warm-up + {args.rounds} interleaved rounds; "
        "ratio = median of per-round ratios",
    ]


def timed_phase(
    title: str,
    cases: dict[str, Callable[[], object]],
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[dict[str, list[float]], float | None]:
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


def timed_figure(
    name: str,
    phase: tuple[dict[str, list[float]], float | None],
    ours: str,
    other: str,
    goal: float | None,
) -> Figure:
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


# ------------------------------------------------------------------------ memory
def memory_worker(args: argparse.Namespace) -> None:
    """Child process: build one side, train ``memory_steps`` steps, print its peak as JSON.

    Both sides import both libraries first, so import footprint does not count. The
    peak is reset after setup, so it covers the training steps (activations, grads,
    AdamW state) on top of the resident model, not model construction.
    """
    import peft  # noqa: F401  (same imports on both sides)

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = build_base(args, device, DTYPES[args.dtype])
    if args.memory_worker == "ours":
        attach_ours(model, args)
    else:
        model = attach_peft(model, args)
    model.train()
    ids = make_batch(args, device)
    step = train_fn(model, ids, [])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    else:
        before = timing.current_rss_bytes()
        if not timing.reset_peak_rss():
            print("warning: cannot reset the peak-RSS watermark", file=sys.stderr)
    for _ in range(args.memory_steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = timing.peak_rss_bytes()
    print(json.dumps({"before": before, "peak": peak}))


def measure_memory(args: argparse.Namespace, argv: list[str]) -> dict[str, list[dict[str, int]]]:
    """Run each side twice, interleaved, each time in a fresh interpreter."""
    results: dict[str, list[dict[str, int]]] = {"ours": [], "peft": []}
    for side in ["ours", "peft", "peft", "ours"]:
        command = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-worker", side]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {side} failed:\n{done.stderr[-3000:]}")
        results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


# ----------------------------------------------------------------------- profile
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


# -------------------------------------------------------------------------- main
def run(args: argparse.Namespace, argv: list[str]) -> tuple[list[Figure], list[str]]:
    """All phases; returns the figures and the equivalence-check lines."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)

    base = build_base(args, device, dtype)
    ours_model = copy.deepcopy(base)
    peft_model = attach_peft(copy.deepcopy(base), args)
    delta = attach_ours(ours_model, args)
    copied = copy_lora_into_peft(delta, peft_model)
    n_ours, n_peft = (sum(p.numel() for p in trainable(m)) for m in (ours_model, peft_model))
    peft_model.eval()
    ids = make_batch(args, device)

    fwd = {name: forward_fn(m, ids) for name, m in [("ours", ours_model), ("peft", peft_model)]}
    fwd["base"] = forward_fn(base, ids)
    checks: list[str] = []

    def check(line: str) -> None:
        print(f"check: {line}")
        checks.append(line)

    out = {name: fn() for name, fn in fwd.items()}
    print()
    check(f"{copied} LoRA factors copied; trainable params ours {n_ours}, PEFT {n_peft}")
    check(
        f"max |logits ours - PEFT| = {max_diff(out['ours'], out['peft']):.3g} "
        f"(LoRA effect |ours - base| = {max_diff(out['ours'], out['base']):.3g}, "
        f"max |logits| = {out['ours'].abs().max().item():.3g})"
    )
    if n_ours != n_peft:
        raise SystemExit("trainable parameter counts differ: not the same LoRA")

    # 1. LoRA forward (base included for the LoRA overhead, as information)
    t_fwd = timed_phase("LoRA forward (eval, no_grad)", fwd, args, device)

    if args.profile:
        profile_forwards({"ours": fwd["ours"], "peft": fwd["peft"]}, args.profile)

    # 2. train step
    losses: dict[str, list[torch.Tensor]] = {"ours": [], "peft": []}
    ours_model.train()
    peft_model.train()
    train = {
        "ours": train_fn(ours_model, ids, losses["ours"]),
        "peft": train_fn(peft_model, ids, losses["peft"]),
    }
    t_train = timed_phase("LoRA train step (LM loss fwd + bwd + AdamW)", train, args, device)
    ours_model.eval()
    peft_model.eval()
    loss_gap = max(abs(a.item() - b.item()) for a, b in zip(losses["ours"], losses["peft"]))
    after = {name: fwd[name]() for name in ("ours", "peft")}
    check(
        f"after {len(losses['ours'])} train steps: max |loss ours - PEFT| = {loss_gap:.3g}, "
        f"max |logits ours - PEFT| = {max_diff(after['ours'], after['peft']):.3g}"
    )

    # 3. merged forward against the hook-free base
    delta.merge()
    peft_model.merge_adapter()
    merged = {"ours": fwd["ours"](), "peft": fwd["peft"]()}
    check(
        f"merged vs unmerged max |logits diff|: ours {max_diff(merged['ours'], after['ours']):.3g}"
        f", PEFT {max_diff(merged['peft'], after['peft']):.3g}"
    )
    t_merged = timed_phase(
        "merged forward (eval, no_grad) vs base without delta",
        {"ours merged": fwd["ours"], "peft merged": fwd["peft"], "base": fwd["base"]},
        args,
        device,
    )
    delta.unmerge()
    peft_model.unmerge_adapter()
    check(f"after unmerge, max |logits diff| ours {max_diff(fwd['ours'](), after['ours']):.3g}")

    figures = [
        timed_figure("LoRA forward, ours / PEFT", t_fwd, "ours", "peft", GOALS["forward"]),
        timed_figure("LoRA forward, ours / base (no LoRA)", t_fwd, "ours", "base", None),
        timed_figure("LoRA train step, ours / PEFT", t_train, "ours", "peft", GOALS["train"]),
        timed_figure(
            "merged forward, ours / base", t_merged, "ours merged", "base", GOALS["merged"]
        ),
        timed_figure(
            "merged forward, PEFT / base (reference)", t_merged, "peft merged", "base", None
        ),
    ]

    # 4. peak memory, fresh processes
    if not args.no_memory:
        what = "CUDA allocated" if device.type == "cuda" else "RSS"
        mem = measure_memory(args, argv)
        print(f"\npeak {what} while training {args.memory_steps} steps (fresh process each)")
        for side, runs in mem.items():
            peaks = ", ".join(f"{r['peak'] / MIB:.1f}" for r in runs)
            grows = ", ".join(f"{(r['peak'] - r['before']) / MIB:.1f}" for r in runs)
            print(f"  {side:<5} peak MiB: {peaks}   growth over setup MiB: {grows}")
        peak = {side: timing.median([r["peak"] / MIB for r in runs]) for side, runs in mem.items()}
        grow = {
            side: timing.median([(r["peak"] - r["before"]) / MIB for r in runs])
            for side, runs in mem.items()
        }
        figures.append(
            Figure(
                f"peak {what} in training, ours / PEFT",
                peak["ours"],
                peak["peft"],
                peak["ours"] / peak["peft"],
                GOALS["memory"],
                "MiB",
                "runs "
                + " / ".join(", ".join(f"{r['peak'] / MIB:.0f}" for r in mem[side]) for side in mem)
                + " MiB",
            )
        )
        figures.append(
            Figure(
                f"training growth of {what} (peak - setup), ours / PEFT",
                grow["ours"],
                grow["peft"],
                grow["ours"] / grow["peft"] if grow["peft"] > 0 else float("nan"),
                None,
                "MiB",
            )
        )
    return figures, checks


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    if args.memory_worker:
        memory_worker(args)
        return
    torch.set_num_threads(args.threads)
    env = environment(args, torch.device(args.device))
    print("\n".join(env))
    figures, checks = run(args, argv)

    print("\nresults (ratio = median of per-round ratios; best = fastest over fastest)")
    width = max(len(f.name) for f in figures)
    for f in figures:
        cells = f.cells()
        print(
            f"  {cells[0]:<{width}}  {cells[1]:>12}  {cells[2]:>12}  ratio {cells[3]}  "
            f"goal {cells[4]:<7}  {cells[5]:<4}  {f.notes}"
        )
    text = "\n".join(
        [
            "# deltahooks LoRA vs PEFT",
            "",
            *(f"- {line}" for line in env),
            "",
            markdown_table(figures),
            "",
            *(f"- {f.name}: {f.notes}" for f in figures if f.notes),
            *(f"- {line}" for line in checks),
            "",
        ]
    )
    print("\n" + markdown_table(figures))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
