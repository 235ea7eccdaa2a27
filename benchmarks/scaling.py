"""How deltahooks' cost grows with model size: attach, detach and forward overhead vs layers.

Why: a hook-based delta does per-layer work at attach time (resolve, build, register) and
per-layer work in every forward (one hook call and two small GEMMs). Both should grow
linearly with the number of adapted layers and nothing should grow faster. This script
sweeps depth x LoRA rank on a Llama-shaped model, so a user can see that the attach cost
per adapted layer stays flat and that the forward overhead over the frozen base does not
creep up with depth. PEFT's forward overhead is measured in the same rounds for reference.

Method, per (layers, rank):
  - attach / detach: ``--attach-rounds`` attach + detach cycles of ``dh.LoRA`` (default
    init, alpha = 2r, all seven linear kinds) on one copy of the model after one warm-up
    cycle; detach restores the model exactly, so every cycle starts from the same state.
  - forward overhead: frozen base, ours and PEFT (identical LoRA factors copied into PEFT)
    run interleaved (A B C, C B A, ...), eval + no_grad; the figure is the median of the
    per-round ratios to the base, as in ``python -m benchmarks --method lora``. The three models share the
    base weight tensors, so they read the same memory and the 32-layer sweep fits in RAM.

Usage:
    python -m benchmarks.scaling                 # layers 2,8,32 x ranks 4,16,64; minutes
    python -m benchmarks.scaling --quick         # tiny smoke run
    python -m benchmarks.scaling --device cuda --dtype bfloat16

Writes ``benchmarks/out/scaling.md`` and ``benchmarks/out/scaling.png``.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import deltahooks as dh

from . import _timing as timing
from .harness import BUSY_WARNING, DTYPES, build_base, forward_fn, make_batch, max_diff, trainable
from .methods import LINEARS, METHODS
from .report import device_name

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "scaling.md"

# (default, --quick); an explicit flag beats both
SHAPES: dict[str, tuple[int, int]] = {
    "hidden": (512, 64),
    "intermediate": (1376, 172),
    "heads": (8, 4),
    "vocab": (32000, 1000),
    "batch": (2, 2),
    "seq": (64, 32),
    "rounds": (5, 2),
    "warmup": (1, 1),
    "attach_rounds": (5, 2),
}
SWEEPS: dict[str, tuple[str, str]] = {"layers": ("2,8,32", "2,4"), "ranks": ("4,16,64", "4,16")}


# --------------------------------------------------------------------------- setup
def int_list(text: str) -> list[int]:
    """``"2,8,32"`` -> ``[2, 8, 32]``; every entry must be a positive integer."""
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 2,8,32, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, (ref, quick) in SWEEPS.items():
        parser.add_argument(
            f"--{name}", type=int_list, default=None, help=f"default {ref} ({quick} quick)"
        )
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: smoke run")
    for name, (ref, quick) in SHAPES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"default {ref} ({quick} quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown path (+ .png)")
    args = parser.parse_args(argv)
    for name, (ref, quick) in SWEEPS.items():
        if getattr(args, name) is None:
            setattr(args, name, int_list(quick if args.quick else ref))
    for name, (ref, quick) in SHAPES.items():
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else ref)
    if args.rounds < 1 or args.warmup < 0 or args.attach_rounds < 1:
        parser.error("--rounds and --attach-rounds must be >= 1, --warmup >= 0")
    return args


def workload(args: argparse.Namespace, layers: int, rank: int) -> argparse.Namespace:
    """The namespace LoRA's row of the table expects, for one point of the sweep."""
    point = copy.copy(args)
    point.layers = layers
    point.rank = rank
    point.alpha = 2.0 * rank
    point.dropout = 0.0  # the sweep measures hooks, not dropout
    return point


def sharing_copy(model: nn.Module) -> nn.Module:
    """A copy with its own modules but the *same* parameter tensors as ``model``.

    Why: base, ours and PEFT then read identical weight memory (no cache or NUMA
    advantage for either side) and three 32-layer copies cost the RAM of one.
    Neither side writes base weights unless merged, which this script never does.
    """
    memo: dict[int, object] = {id(p): p for p in model.parameters()}
    return copy.deepcopy(model, memo)


def spec_for(rank: int) -> dh.LoRA:
    """What a user would attach: default init, alpha = 2r, all seven linear kinds."""
    return dh.LoRA(targets=LINEARS, r=rank, alpha=2.0 * rank, dropout=0.0)


# -------------------------------------------------------------------- measurement
@dataclass
class Row:
    """One (layers, rank) point: attach/detach cost, size of the delta, forward ratios."""

    layers: int
    rank: int
    adapted: int
    params: int
    attach_ms: float
    detach_ms: float
    base_ms: float
    ours_ratio: float
    peft_ratio: float
    ours_best: float
    peft_best: float
    noise: float
    busy: float | None
    logits_gap: float
    lora_effect: float

    @property
    def attach_us_per_layer(self) -> float:
        return self.attach_ms * 1e3 / self.adapted


def time_attach_detach(
    model: nn.Module, rank: int, rounds: int, device: torch.device
) -> tuple[list[float], list[float], int, int]:
    """Attach/detach cycles on ``model``; seconds per attach and detach, layers, params.

    One warm-up cycle first (first-call costs: imports, allocator). After every detach
    the model must have exactly the state_dict keys it started with.
    """
    keys = list(model.state_dict())
    attaches: list[float] = []
    detaches: list[float] = []
    adapted = params = 0
    holder: list[dh.Delta] = []

    def attach() -> None:
        holder.append(dh.attach(model, spec_for(rank)))

    for index in range(rounds + 1):
        took = timing.time_call(attach, device)
        delta = holder.pop()
        adapted = len(delta.paths)
        params = sum(p.numel() for _, p in delta.named_parameters())
        gone = timing.time_call(delta.detach, device)
        if list(model.state_dict()) != keys:
            raise SystemExit("detach did not restore the model's state_dict keys")
        if index > 0:
            attaches.append(took)
            detaches.append(gone)
    return attaches, detaches, adapted, params


def measure(
    base: nn.Module, point: argparse.Namespace, ids: torch.Tensor, device: torch.device
) -> Row:
    """Attach/detach cycles, then interleaved forwards of base, ours and PEFT."""
    attaches, detaches, adapted, params = time_attach_detach(
        sharing_copy(base), point.rank, point.attach_rounds, device
    )

    ours_model = sharing_copy(base)
    # LoRA's row: random A and B, the same on both sides: equal, non-trivial work
    delta, peft_model, _ = METHODS["lora"].pair(ours_model, sharing_copy(base), point)
    peft_model.eval()
    peft_params = sum(p.numel() for p in trainable(peft_model))
    if peft_params != params or len(delta.paths) != adapted:
        raise SystemExit(f"ours and PEFT differ: {params} vs {peft_params} trainable params")

    cases = {
        "base": forward_fn(base, ids),
        "ours": forward_fn(ours_model, ids),
        "peft": forward_fn(peft_model, ids),
    }
    ours_logits = cases["ours"]()
    gap = max_diff(ours_logits, cases["peft"]())
    effect = max_diff(ours_logits, cases["base"]())  # proves the LoRA path ran
    del ours_logits
    with timing.Contention() as busy:
        times = timing.interleave(cases, rounds=point.rounds, warmup=point.warmup, device=device)
    delta.detach()
    return Row(
        layers=point.layers,
        rank=point.rank,
        adapted=adapted,
        params=params,
        attach_ms=timing.median(attaches) * 1e3,
        detach_ms=timing.median(detaches) * 1e3,
        base_ms=timing.median(times["base"]) * 1e3,
        ours_ratio=timing.paired_ratio(times["ours"], times["base"]),
        peft_ratio=timing.paired_ratio(times["peft"], times["base"]),
        ours_best=timing.ratio_of_minima(times["ours"], times["base"]),
        peft_best=timing.ratio_of_minima(times["peft"], times["base"]),
        noise=max(timing.spread(times[name]) for name in times),
        busy=busy.share,
        logits_gap=gap,
        lora_effect=effect,
    )


# ----------------------------------------------------------------------- reporting
HEADER = [
    "layers",
    "r",
    "adapted",
    "trainable params",
    "attach ms",
    "attach µs/layer",
    "detach ms",
    "base fwd ms",
    "ours/base",
    "PEFT/base",
    "noise",
    "others' CPU",
]


def cells(row: Row) -> list[str]:
    busy = "?" if row.busy is None else f"{row.busy * 100:.0f}%"
    return [
        str(row.layers),
        str(row.rank),
        str(row.adapted),
        f"{row.params:,}",
        f"{row.attach_ms:.1f}",
        f"{row.attach_us_per_layer:.0f}",
        f"{row.detach_ms:.1f}",
        f"{row.base_ms:.1f}",
        f"{row.ours_ratio:.3f}",
        f"{row.peft_ratio:.3f}",
        f"±{row.noise * 100:.1f}%",
        busy,
    ]


def text_table(rows: list[Row]) -> str:
    """Fixed-width, right-aligned: readable in a terminal and a log."""
    grid = [HEADER, *(cells(r) for r in rows)]
    widths = [max(len(line[i]) for line in grid) for i in range(len(HEADER))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(line, widths)) for line in grid)


def markdown_table(rows: list[Row]) -> str:
    grid = [HEADER, ["---:"] * len(HEADER), *(cells(r) for r in rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in grid)


def environment(args: argparse.Namespace, device: torch.device) -> list[str]:
    """Date, machine, versions and workload: what a reader needs to compare two runs."""
    import peft
    import transformers

    commit, now = timing.git_commit(), timing.utc_now()
    return [
        f"date: {now}",
        f"device: {device} - {device_name(device)}; torch threads: {torch.get_num_threads()}"
        f"; platform {platform.platform()}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"deltahooks {dh.__version__} ({commit})",
        f"workload: Llama hidden={args.hidden} intermediate={args.intermediate} "
        f"heads={args.heads} vocab={args.vocab}, layers {args.layers}, random weights, "
        f"{args.dtype}; batch {args.batch} x {args.seq} tokens, eval + no_grad",
        f"LoRA: r in {args.ranks}, alpha = 2r, dropout 0, on {','.join(LINEARS)}",
        f"timing: attach/detach median of {args.attach_rounds} cycles after 1 warm-up; "
        f"forward {args.warmup} warm-up + {args.rounds} interleaved rounds of base/ours/PEFT, "
        "ratio = median of per-round ratios to the base",
    ]


def plot(rows: list[Row], path: Path, title: str) -> None:
    """Attach time vs layers per rank, and forward overhead vs layers for ours and PEFT."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = sorted({r.rank for r in rows})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for index, rank in enumerate(ranks):
        points = sorted((r for r in rows if r.rank == rank), key=lambda r: r.layers)
        layers = [r.layers for r in points]
        color = colors[index % len(colors)]
        left.plot(layers, [r.attach_ms for r in points], "o-", color=color, label=f"r={rank}")
        right.plot(
            layers, [r.ours_ratio for r in points], "o-", color=color, label=f"ours r={rank}"
        )
        right.plot(
            layers, [r.peft_ratio for r in points], "s--", color=color, label=f"PEFT r={rank}"
        )
    left.set(xlabel="decoder layers", ylabel="attach time (ms)", title="attach (deltahooks)")
    left.set_ylim(bottom=0)
    left.set_xlim(left=0)
    right.axhline(1.0, color="grey", linewidth=0.8)
    right.set(
        xlabel="decoder layers",
        ylabel="LoRA forward / frozen base forward",
        title="forward overhead",
    )
    ticks = sorted({r.layers for r in rows})
    for axis in (left, right):
        axis.set_xticks(ticks)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# -------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", category=FutureWarning)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    torch.set_num_threads(args.threads)
    env = environment(args, device)
    print("\n".join(env))

    rows: list[Row] = []
    for layers in args.layers:
        base = build_base(workload(args, layers, args.ranks[0]), device, dtype)
        ids = make_batch(args, device)
        for rank in args.ranks:
            row = measure(base, workload(args, layers, rank), ids, device)
            rows.append(row)
            busy = "" if row.busy is None else f", others' CPU use {row.busy * 100:.0f}%"
            print(
                f"layers {layers:3d} r {rank:3d}: attach {row.attach_ms:7.1f} ms, "
                f"detach {row.detach_ms:6.1f} ms, fwd ours/base {row.ours_ratio:.3f} "
                f"(best {row.ours_best:.3f}), PEFT/base {row.peft_ratio:.3f} "
                f"(best {row.peft_best:.3f}), |logits ours - PEFT| {row.logits_gap:.2g}{busy}",
                flush=True,
            )
        del base
        if device.type == "cuda":
            torch.cuda.empty_cache()

    busiest = max((r.busy for r in rows if r.busy is not None), default=None)
    notes = [
        "attach µs/layer = attach ms / adapted layers: flat across rows means linear scaling",
        "noise = largest relative half-IQR of the three forward timings in that row",
        "best-of-rounds ratios (ours / PEFT vs base): "
        + "; ".join(f"L{r.layers} r{r.rank} {r.ours_best:.3f}/{r.peft_best:.3f}" for r in rows),
        "max |logits ours - PEFT| per row (same LoRA factors), next to the LoRA effect "
        "max |logits ours - base|: "
        + ", ".join(f"{r.logits_gap:.2g} vs {r.lora_effect:.2g}" for r in rows),
    ]
    if busiest is not None and busiest > BUSY_WARNING:
        notes.append(
            f"WARNING: other processes used up to {busiest * 100:.0f}% of the CPUs during a "
            "row; forward ratios there are unreliable (compare the best-of-rounds ratios)"
        )
    print("\n" + text_table(rows))
    print("\n".join(f"  {line}" for line in notes))

    png = args.out.with_suffix(".png")
    text = "\n".join(
        [
            "# deltahooks scaling: attach, detach and forward overhead vs model depth",
            "",
            *(f"- {line}" for line in env),
            "",
            markdown_table(rows),
            "",
            *(f"- {line}" for line in notes),
            "",
            f"![scaling]({png.name})",
            "",
        ]
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    plot(
        rows,
        png,
        f"Llama hidden {args.hidden}, {args.dtype}, batch {args.batch}x{args.seq}, "
        f"{device} ({os.cpu_count()} CPUs, {torch.get_num_threads()} threads)",
    )
    print(f"\nwrote {args.out} and {png}")


if __name__ == "__main__":
    main()
