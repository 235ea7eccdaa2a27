"""The machinery the ``*_vs_peft.py`` benchmarks share: workload, timing phases, memory
workers, checks and reports.

Why one module: every comparison with PEFT runs the same way (``lora_vs_peft.py``
explains why it is shaped so: interleaved rounds, the same values on both sides, checks
before times), so only what is specific to a method lives in its script. A method script
describes itself with a :class:`MethodBench` (how to attach ours and PEFT's, how the two
get the same values, labels, goals) and calls :func:`main`; it then gets the command
line, the environment lines, the parity checks, the interleaved forward / train step /
merged timings, the peak-memory figure from fresh subprocesses and the markdown table.

Example (a script next to this one)::

    BENCH = MethodBench(
        title="deltahooks IA3 vs PEFT",
        doc=__doc__,
        script=__file__,
        labels={"ia3": "IA3"},
        attach_ours=attach_ours,  # (method, model, args) -> dh.Delta
        attach_peft=attach_peft,  # (method, model, args) -> PEFT's model
        share=copy_into_peft,  # (method, delta, peft_model) -> tensors copied
        workload=lambda args: "IA3 on k_proj,v_proj,down_proj",
    )
    if __name__ == "__main__":
        main(BENCH)
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
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
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

GOALS = {"forward": 1.00, "train": 1.00, "merged": 1.01, "memory": 1.00}
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


def environment(args: argparse.Namespace, device: torch.device, workload: str) -> list[str]:
    """Date, device, versions, the Llama workload (``workload`` appended) and the timing."""
    import peft
    import transformers

    return [
        f"date: {timing.utc_now()}",
        f"device: {device} - {device_name(device)}; torch threads: {torch.get_num_threads()}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"deltahooks {dh.__version__} ({timing.git_commit()})",
        f"workload: Llama hidden={args.hidden} layers={args.layers} "
        f"intermediate={args.intermediate} heads={args.heads} vocab={args.vocab}, "
        f"batch {args.batch} x {args.seq} tokens, {args.dtype}; {workload}",
        f"timing: {args.warmup} warm-up + {args.rounds} interleaved rounds; "
        "ratio = median of per-round ratios",
    ]


def markdown_report(title: str, env: list[str], figures: list[Figure], checks: list[str]) -> str:
    """The markdown file: heading, environment, table, each figure's notes, the checks."""
    return "\n".join(
        [
            f"# {title}",
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


def report(title: str, env: list[str], figures: list[Figure], checks: list[str], out: Path) -> None:
    """Print the results and the table; write the markdown to ``out``."""
    print("\nresults (ratio = median of per-round ratios; best = fastest over fastest)")
    width = max(len(f.name) for f in figures)
    for f in figures:
        cells = f.cells()
        print(
            f"  {cells[0]:<{width}}  {cells[1]:>12}  {cells[2]:>12}  ratio {cells[3]}  "
            f"goal {cells[4]:<7}  {cells[5]:<4}  {f.notes}"
        )
    print("\n" + markdown_table(figures))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(markdown_report(title, env, figures, checks))
    print(f"\nwrote {out}")


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


def measure_memory(script: str, argv: list[str], *worker: str) -> dict[str, list[dict[str, int]]]:
    """Each side twice, interleaved, each time in a fresh interpreter running ``script``
    with ``--memory-worker *worker SIDE``."""
    results: dict[str, list[dict[str, int]]] = {"ours": [], "peft": []}
    for side in ["ours", "peft", "peft", "ours"]:
        command = [sys.executable, str(Path(script).resolve()), *argv]
        command += ["--memory-worker", *worker, side]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            name = " ".join([*worker, side])
            raise RuntimeError(f"memory worker {name} failed:\n{done.stderr[-3000:]}")
        results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def memory_runs_note(mem: dict[str, list[dict[str, int]]]) -> str:
    """``runs 512, 515 / 530, 529 MiB``: every worker's peak, ours first."""
    return (
        "runs "
        + " / ".join(", ".join(f"{r['peak'] / MIB:.0f}" for r in mem[s]) for s in mem)
        + " MiB"
    )


# ------------------------------------------------------------- method benchmarks
def peft_tensors(
    delta: dh.Delta, peft_model: nn.Module
) -> list[tuple[nn.Module, str, torch.Tensor]]:
    """(PEFT's layer, tensor name, our tensor) for each of our tensors: what a ``share``
    hook walks to copy values between the sides (``lora_A``, ``ia3_l``, ``oft_R``, ...)."""
    inner = peft_model.base_model.model
    return [
        (inner.get_submodule(part.path), key.rsplit(".", 1)[1], tensor)
        for part in delta.parts
        for key, tensor in part.tensors.items()
    ]


def _no_arguments(parser: argparse.ArgumentParser) -> None:
    """Default of :attr:`MethodBench.add_arguments`: no flags beyond the shared ones."""


def adamw_step(
    method: str,
    side: str,
    model: nn.Module,
    delta: dh.Delta | None,
    ids: torch.Tensor,
    losses: list[torch.Tensor],
) -> Callable[[], None]:
    """Default of :attr:`MethodBench.train_step`: :func:`train_fn` without weight decay."""
    return train_fn(model, ids, losses, weight_decay=0.0)


@dataclass
class MethodBench:
    """What a method-vs-PEFT script supplies; :func:`main` runs the rest.

    Hooks take the method name (a key of ``labels``) first, so one script can hold
    several methods. ``pair`` defaults to: PEFT attached to its copy of the base, then
    ours to our copy, then ``share`` gives both sides the same values (either way).
    """

    title: str  # the markdown heading: "deltahooks IA3 and LN tuning vs PEFT"
    doc: str  # the script's __doc__: its first paragraph is the --help description
    script: str  # the script's __file__: memory workers run it again
    labels: dict[str, str]  # method -> label; the keys, in order, are --methods' choices
    attach_ours: Callable[[str, nn.Module, argparse.Namespace], dh.Delta]
    attach_peft: Callable[[str, nn.Module, argparse.Namespace], nn.Module]
    workload: Callable[[argparse.Namespace], str]  # the end of the environment's workload line
    share: Callable[[str, dh.Delta, nn.Module], int] | None = None  # -> tensors copied
    # (method, our copy, PEFT's copy, args) -> (our delta, PEFT's model, tensors copied)
    pair: Callable[..., tuple[dh.Delta, nn.Module, int | None]] | None = None
    train_step: Callable[..., Callable[[], None]] = adamw_step  # signature of adamw_step
    train_title: str = "train step (LM loss fwd + bwd + AdamW)"
    add_arguments: Callable[[argparse.ArgumentParser], None] = _no_arguments  # after --seed
    small: dict[str, int] | None = None  # shapes of a --small flag, if the script has one
    profile: bool = True  # a --profile N flag (torch.profiler op table of N forwards)
    peft_reference: bool = True  # the "forward, PEFT / base (reference)" row
    check_unmerge: bool = True  # check the logits once the merged delta is unmerged again
    goals: dict[str, float] = field(default_factory=lambda: dict(GOALS))

    def make_pair(
        self, method: str, ours_model: nn.Module, peft_source: nn.Module, args: argparse.Namespace
    ) -> tuple[dh.Delta, nn.Module, int | None]:
        if self.pair is not None:
            return self.pair(method, ours_model, peft_source, args)
        peft_model = self.attach_peft(method, peft_source, args)
        delta = self.attach_ours(method, ours_model, args)
        if self.share is None:
            raise TypeError("a MethodBench needs share (or pair) to give both sides one value")
        return delta, peft_model, self.share(method, delta, peft_model)


def parse_args(bench: MethodBench, argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(bench.doc.split("\n\n")[0])
    if bench.small is not None:
        parser.add_argument("--small", action="store_true", help=f"smaller model: {bench.small}")
    methods = tuple(bench.labels)
    parser.add_argument("--methods", default=",".join(methods), help="comma-separated subset")
    add_shape_flags(parser, SHAPES)
    parser.add_argument("--seed", type=int, default=0)
    bench.add_arguments(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess figure")
    if bench.profile:
        parser.add_argument(
            "--profile", type=int, default=0, metavar="N", help="profile N forwards of each side"
        )
    default_out = HERE / "out" / (Path(bench.script).stem + ".md")
    parser.add_argument("--out", type=Path, default=default_out, help="markdown table path")
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS
    )
    args = fill_shapes(parser, parser.parse_args(argv), SHAPES, bench.small)
    args.methods = [m for m in args.methods.split(",") if m]
    if not set(args.methods) <= set(methods) or not args.methods:
        parser.error(f"--methods takes a comma-separated subset of {list(methods)}")
    return args


def memory_worker(bench: MethodBench, args: argparse.Namespace) -> None:
    """Child process: build one side of one method, train, print its peak as JSON."""
    import peft  # noqa: F401  (same imports on both sides)

    method, side = args.memory_worker
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = build_base(args, device, DTYPES[args.dtype])
    delta = None
    if side == "ours":  # the same shapes as in the timed run; values do not change memory
        delta = bench.attach_ours(method, model, args)
    else:
        model = bench.attach_peft(method, model, args)
    model.train()
    step = bench.train_step(method, side, model, delta, make_batch(args, device), [])
    print_training_peak(step, device, args.memory_steps)


def run_method(
    bench: MethodBench, method: str, base: nn.Module, args: argparse.Namespace, argv: list[str]
) -> tuple[list[Figure], list[str]]:
    """One method: parity checks, interleaved forward / train / merged timings, memory."""
    device = torch.device(args.device)
    label = bench.labels[method]
    goals = bench.goals
    ours_model = copy.deepcopy(base)
    delta, peft_model, copied = bench.make_pair(method, ours_model, copy.deepcopy(base), args)
    n_ours, n_peft = (sum(p.numel() for p in trainable(m)) for m in (ours_model, peft_model))
    peft_model.eval()
    ids = make_batch(args, device)
    checks: list[str] = []

    def check(line: str) -> None:
        print(f"check: {label}: {line}")
        checks.append(f"{label}: {line}")

    fwd = {name: forward_fn(m, ids) for name, m in [("ours", ours_model), ("peft", peft_model)]}
    fwd["base"] = forward_fn(base, ids)
    out = {name: fn() for name, fn in fwd.items()}
    counts = f"trainable params ours {n_ours}, PEFT {n_peft}"
    check(counts if copied is None else f"{copied} tensors copied; {counts}")
    check(
        f"max |logits ours - PEFT| = {max_diff(out['ours'], out['peft']):.3g} "
        f"(effect |ours - base| = {max_diff(out['ours'], out['base']):.3g})"
    )
    if n_ours != n_peft:
        raise SystemExit(f"{label}: trainable parameter counts differ: not the same delta")

    t_fwd = timed_phase(f"{label} forward (eval, no_grad)", fwd, args, device)
    if getattr(args, "profile", 0):
        profile_forwards({"ours": fwd["ours"], "peft": fwd["peft"]}, args.profile)

    t_train, after = timed_training(
        f"{label} {bench.train_title}",
        {"ours": ours_model, "peft": peft_model},
        lambda side, model, losses: bench.train_step(
            method, side, model, delta if side == "ours" else None, ids, losses
        ),
        fwd,
        args,
        device,
        check,
    )

    delta.merge()
    merged = fwd["ours"]()
    check(f"merged vs unmerged max |logits diff|: ours {max_diff(merged, after['ours']):.3g}")
    t_merged = timed_phase(
        f"{label} merged forward vs base without delta",
        {"ours merged": fwd["ours"], "base": fwd["base"]},
        args,
        device,
    )
    delta.unmerge()
    if bench.check_unmerge:
        check(f"after unmerge, max |logits diff| ours {max_diff(fwd['ours'](), after['ours']):.3g}")

    figures = [
        timed_figure(f"{label} forward, ours / PEFT", t_fwd, "ours", "peft", goals["forward"]),
        timed_figure(f"{label} forward, ours / base (no delta)", t_fwd, "ours", "base", None),
    ]
    if bench.peft_reference:
        figures.append(
            timed_figure(f"{label} forward, PEFT / base (reference)", t_fwd, "peft", "base", None)
        )
    figures += [
        timed_figure(f"{label} train step, ours / PEFT", t_train, "ours", "peft", goals["train"]),
        timed_figure(
            f"{label} merged forward, ours / base", t_merged, "ours merged", "base", goals["merged"]
        ),
    ]
    if not args.no_memory:
        what = "CUDA allocated" if device.type == "cuda" else "RSS"
        mem = measure_memory(bench.script, argv, method)
        for side, runs in mem.items():
            peaks = ", ".join(f"{r['peak'] / MIB:.1f}" for r in runs)
            print(f"  {label} {side:<5} peak {what} MiB: {peaks}")
        peak = {side: timing.median([r["peak"] / MIB for r in runs]) for side, runs in mem.items()}
        figures.append(
            Figure(
                f"{label} peak {what} in training, ours / PEFT",
                peak["ours"],
                peak["peft"],
                peak["ours"] / peak["peft"],
                goals["memory"],
                "MiB",
                memory_runs_note(mem),
            )
        )
    return figures, checks


def main(bench: MethodBench, argv: list[str] | None = None) -> None:
    """The whole benchmark of a method script (or, with ``--memory-worker``, one worker)."""
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(bench, argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Uu]nmerge.*")
    if args.memory_worker:
        memory_worker(bench, args)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args, device, bench.workload(args))
    print("\n".join(env))
    base = build_base(args, device, DTYPES[args.dtype])
    figures: list[Figure] = []
    checks: list[str] = []
    for method in args.methods:
        more_figures, more_checks = run_method(bench, method, base, args, argv)
        figures += more_figures
        checks += more_checks
    report(bench.title, env, figures, checks, args.out)
