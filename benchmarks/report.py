"""What a comparison prints and writes: the ``Figure`` rows, the environment lines and the
markdown file (heading, environment, table, each figure's notes, the checks).

Why one module: every result file in ``benchmarks/results/`` has this one format, which
``ratios_chart.py`` and the README read back.
"""

from __future__ import annotations

import argparse
import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

import deltahooks as dh

from . import _timing as timing


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
