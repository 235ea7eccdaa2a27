"""Quality table on the real MiniLM-L6: full FT, head only, PEFT LoRA, every deltahooks method.

Why: speed benchmarks say nothing about whether a delta *learns*. This script trains the
demo's task (VADER word polarity, see ``deltahooks.demo``) with each method under one
recipe and reports what a user picks a method by: test accuracy over several seeds,
trainable parameters, train time, training memory and the size of the file to ship.

Recipe, the same for every row: one fixed 80/20 train/test split (split seed 0), batch 32,
max_length 16, AdamW, the demo's per-method learning rate (PEFT uses LoRA's) except for
head only (1e-2, see ``LEARNING_RATES``). A seed changes the head's initialisation, the
LoRA initialisation, dropout and the batch order, never the split. Each (method, seed) run is a fresh interpreter, so peak memory of one run
cannot leak into the next; the runs are interleaved (seed 0: A B C D, seed 1: D C B A, ...)
so slow drift of a shared machine spreads over all methods.

Usage:
    python -m benchmarks.quality                  # 3 seeds x 22 methods, ~1 h on a quiet 2-core box
    python -m benchmarks.quality --quick          # 1 seed, 0.2 epochs: smoke run
    python -m benchmarks.quality --methods lora peft --seeds 5
    python -m benchmarks.quality --full-epochs 1  # cheaper full fine-tuning row
    python -m benchmarks.quality --methods dora --resume runs.jsonl  # one method now, ...
    python -m benchmarks.quality --methods dora oft --resume runs.jsonl  # ... reused here
    python -m benchmarks.quality --methods dora oft --carry benchmarks/results/quality-methods.md
        # new rows added to an earlier run's table, whose rows are kept verbatim (not rerun)

Writes ``benchmarks/out/quality.md`` and ``benchmarks/out/quality.png``
(``quality-quick.*`` under ``--quick``, so a smoke run never overwrites the real table).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from .methods import LEARNING_RATES, METHODS
from .report import Row, check_carry, read_carried, table, write
from .train import run_all, run_worker

OUT_DIR = Path(__file__).resolve().parents[1] / "out"


# --------------------------------------------------------------------- arguments
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=None, help="seeds per method (default 3)")
    parser.add_argument("--epochs", type=float, default=None, help="epochs (default 2)")
    parser.add_argument(
        "--full-epochs",
        type=float,
        default=None,
        help="epochs for full fine-tuning (default: --epochs)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=list(METHODS),
        help=f"rows to run, any of {', '.join(METHODS)} (space- or comma-separated)",
    )
    parser.add_argument("--quick", action="store_true", help="1 seed, 0.2 epochs: a smoke run")
    parser.add_argument(
        "--lr",
        action="append",
        default=[],
        metavar="METHOD=LR",
        help="override one method's learning rate, e.g. --lr head=1e-2 (repeatable)",
    )
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--out", type=Path, default=None, help="markdown path (.png beside it)")
    parser.add_argument(
        "--carry",
        type=Path,
        default=None,
        metavar="MD",
        help="keep the rows of an earlier one-run table of this script (same recipe and seeds) "
        "verbatim, and add this run's rows after them (a method rerun here replaces its row)",
    )
    parser.add_argument(
        "--resume",
        type=Path,
        default=None,
        metavar="JSONL",
        help="record every finished run in this file, and reuse the runs it already holds "
        "(same method, seed, lr, epochs and threads) instead of running them again",
    )
    # worker-only: one run in this fresh interpreter, result as JSON on stdout
    parser.add_argument("--worker", choices=list(METHODS), help=argparse.SUPPRESS)
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--worker-lr", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    methods = [m for item in args.methods for m in item.split(",") if m]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    args.methods = list(dict.fromkeys(methods))  # keep order, drop repeats
    args.seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    args.epochs = args.epochs if args.epochs is not None else (0.2 if args.quick else 2.0)
    args.full_epochs = args.full_epochs if args.full_epochs is not None else args.epochs
    if args.seeds < 1 or not args.epochs > 0 or not args.full_epochs > 0:
        parser.error("--seeds must be >= 1 and epochs positive")
    args.rates = dict(LEARNING_RATES)
    for item in args.lr:
        name, _, value = item.partition("=")
        if name not in METHODS or not value:
            parser.error(f"--lr {item!r}: expected METHOD=LR with METHOD in {list(METHODS)}")
        args.rates[name] = float(value)
    if args.out is None:
        args.out = OUT_DIR / ("quality-quick.md" if args.quick else "quality.md")
    return args


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return
    carried = read_carried(args.carry) if args.carry else None
    if carried is not None:
        for method in args.methods:  # a rerun method replaces its carried row
            carried.cells.pop(method, None)
            carried.notes.pop(method, None)
            carried.bars.pop(method, None)
        check_carry(carried, table([], args)[0], None, args.carry)  # before any compute
    runs = run_all(args)
    write(args, argv, [Row(m, runs.results[m]) for m in args.methods], runs, carried)


if __name__ == "__main__":
    main()
