"""``python -m benchmarks --method all|lora|ia3,ln_tuning|...``: deltahooks against PEFT.

Runs the rows of :mod:`benchmarks.methods` that ``--method`` names and writes one markdown
table per result file (``benchmarks/out/<file>.md``; ``results/`` holds the copies the
README shows). ``--list`` prints the table. Shape flags not given take the result file's
reference shapes (``--quick``: tiny ones, a smoke run; ``--small``: VeRA / AdaLoRA's
recorded run).

Usage:
    python -m benchmarks --method lora             # the reference workload, a few minutes
    python -m benchmarks --method all --quick      # every row, tiny shapes
    python -m benchmarks --method lora --dropout 0.05 --out benchmarks/out/lora_vs_peft_dropout.md
    python -m benchmarks --method ia3,ln_tuning --profile 3
    python -m benchmarks --method dora,loha,lokr --hidden 256 --layers 4 --vocab 8000
    python -m benchmarks --method vera,adalora --small
    python -m benchmarks --method qlora --threads 1   # bitsandbytes NF4 base
    python -m benchmarks --method lora,compiled,qlora --device cuda --dtype bfloat16
"""

from __future__ import annotations

import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

from .harness import SHAPES, base_parser
from .methods import BENCHMARK_OF, BENCHMARKS, METHODS
from .report import report
from .rows import Benchmark, Method, memory_worker

OUT = Path(__file__).resolve().parent / "out"
SHAPE_FLAGS = {name: shape for b in BENCHMARKS for name, shape in b.shapes.items()}


def parser() -> argparse.ArgumentParser:
    parser = base_parser(__doc__.split("\n\n")[0])
    parser.prog = "python -m benchmarks"
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "methods: " + ", ".join(METHODS)
    parser.add_argument("--method", help="all, or comma-separated names (see --list)")
    parser.add_argument("--list", action="store_true", help="print the table of methods")
    parser.add_argument("--small", action="store_true", help="VeRA/AdaLoRA's recorded shapes")
    for name, (ref, quick) in SHAPE_FLAGS.items():
        default = SHAPES.get(name, (ref, quick))
        flag = "--" + name.replace("_", "-")
        help_text = f"default {default[0]} ({default[1]} quick); QLoRA and prompts: their own"
        parser.add_argument(flag, type=int, default=None, help=help_text)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=8, help="LoRA, DoRA, QLoRA")
    parser.add_argument("--alpha", type=float, default=16.0, help="LoRA, DoRA, QLoRA")
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (both sides)")
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess figures")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N forwards of each side"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="markdown path (one result file) or folder"
    )
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS
    )
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)  # QLoRA's saved Llama
    return parser


def selected(text: str | None, parse: argparse.ArgumentParser) -> list[str]:
    if not text:
        parse.error("--method is required: all, or a comma-separated subset (see --list)")
    names = list(METHODS) if text == "all" else [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in METHODS]
    if unknown or not names:
        parse.error(f"--method: unknown {unknown}; choose 'all' or from {list(METHODS)}")
    return names


def for_benchmark(
    benchmark: Benchmark,
    methods: list[Method],
    args: argparse.Namespace,
    parse: argparse.ArgumentParser,
) -> argparse.Namespace:
    """The arguments one result file runs with: shapes not given are its own."""
    args = copy.copy(args)
    for name, (ref, quick) in benchmark.shapes.items():
        if getattr(args, name) is None:
            if args.small and benchmark.small is not None:
                ref = benchmark.small.get(name, ref)
            setattr(args, name, quick if args.quick else ref)
    if args.rounds < 1 or args.warmup < 0:
        parse.error("--rounds must be >= 1 and --warmup >= 0")
    args.methods = [m.name for m in methods]
    args.labels = [m.label for m in methods]
    return args


def out_path(benchmark: Benchmark, out: Path | None, files: int) -> Path:
    if out is None:
        return OUT / f"{benchmark.file}.md"
    if out.suffix == ".md":
        if files > 1:
            raise SystemExit("--out FILE.md takes one result file; give a folder for several")
        return out
    return out / f"{benchmark.file}.md"


def run(benchmark: Benchmark, args: argparse.Namespace, argv: list[str], out: Path) -> None:
    """Every selected method of one result file, then its markdown."""
    device = torch.device(args.device)
    print("\n".join(benchmark.environment(args, device, benchmark.workload(args))))
    figures, checks = [], []
    with benchmark.setup(args) as base:
        for name in args.methods:
            more_figures, more_checks = METHODS[name].measure(
                benchmark, METHODS[name], base, args, argv
            )
            figures += more_figures
            checks += more_checks
    # after the measures: one may settle the warm-up (a compiled step needs more)
    env = benchmark.environment(args, device, benchmark.workload(args))
    report(benchmark.title, env, figures, checks, out)


def print_table() -> None:
    for benchmark in BENCHMARKS:
        print(f"{benchmark.file}.md: {benchmark.title}")
        for m in benchmark.methods:
            print(f"  {m.name:<16} {m.label:<20} {m.measure.__name__}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parse = parser()
    args = parse.parse_args(argv)
    if args.list:
        print_table()
        return
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*[Uu]nmerge.*")
    warnings.filterwarnings("ignore", module=r"(peft|bitsandbytes)(\..*)?")
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        name, side = args.memory_worker
        benchmark, method = BENCHMARK_OF[name], METHODS[name]
        memory_worker(benchmark, method, side, for_benchmark(benchmark, [method], args, parse))
        return
    names = selected(args.method, parse)
    chosen = [(b, [m for m in b.methods if m.name in names]) for b in BENCHMARKS]
    chosen = [(b, methods) for b, methods in chosen if methods]
    for benchmark, methods in chosen:
        bench_args = for_benchmark(benchmark, methods, args, parse)
        run(benchmark, bench_args, argv, out_path(benchmark, args.out, len(chosen)))


if __name__ == "__main__":
    main()
