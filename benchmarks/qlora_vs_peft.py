"""deltahooks LoRA vs PEFT's QLoRA on a 4-bit (bitsandbytes NF4) Llama, interleaved.

Both sides load the same checkpoint (a random Llama saved once to a temporary folder) with
``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``, compute dtype
float32 on CPU (``--device cuda --dtype bfloat16`` on a GPU), and carry the same LoRA factors (PEFT's are copied into ours); the script prints
how far their outputs differ. Models stay in training mode throughout: on CPU,
bitsandbytes repacks NF4 weights for inference at the first eval forward, after which the
layer no longer trains (its limitation, on both sides).

Figures:
  1. forward (no_grad), ours / PEFT                     [<= 1.00]
  2. train step (LM loss fwd + bwd + AdamW), ours / PEFT [<= 1.00]
  3. peak memory while training, ours / PEFT, each side in a fresh process, twice
     (ours, PEFT, PEFT, ours); CPU: RSS, CUDA: max_memory_allocated  [<= 1.00]

Usage:
    python benchmarks/qlora_vs_peft.py --threads 1     # about a minute on 2 cores
    python benchmarks/qlora_vs_peft.py --quick         # smoke run
    python benchmarks/qlora_vs_peft.py --device cuda --dtype bfloat16   # (gpu_suite.sh)

The markdown table is also written to ``benchmarks/out/qlora_vs_peft.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import _timing as timing  # benchmarks/ is sys.path[0] when run as a script
import lora_vs_peft as common
import torch
from _method_vs_peft import device_name, markdown_table, print_training_peak
from torch import nn

dh = common.dh
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "qlora_vs_peft.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MIB = 1024 * 1024
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(common.DTYPES))
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: smoke run")
    for flag, (ref, quick) in SHAPES.items():
        help_text = f"default {ref} ({quick} with --quick)"
        parser.add_argument(f"--{flag.replace('_', '-')}", type=int, default=None, help=help_text)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table path")
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    parser.add_argument("--memory-worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for flag, (ref, quick) in SHAPES.items():
        if getattr(args, flag) is None:
            setattr(args, flag, quick if args.quick else ref)
    args.profile = 0
    return args


def save_checkpoint(args: argparse.Namespace, folder: str) -> None:
    base = common.build_base(args, torch.device("cpu"), torch.float32)
    base.save_pretrained(folder)


def load_nf4(args: argparse.Namespace) -> nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = common.DTYPES[args.dtype]
    config = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.checkpoint, quantization_config=config, device_map={"": args.device}, dtype=dtype
    )
    return model.train()


def attach_peft(args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, target_modules=TARGETS, init_lora_weights=False
    )
    return get_peft_model(load_nf4(args), config)


def attach_ours(args: argparse.Namespace) -> tuple[nn.Module, dh.Delta]:
    model = load_nf4(args)
    return model, dh.attach(model, dh.LoRA(targets=TARGETS, r=args.rank, alpha=args.alpha))


@torch.no_grad()
def copy_from_peft(peft_model: nn.Module, delta: dh.Delta) -> int:
    """Our factors := PEFT's (both in PEFT's layouts: A r x in, B out x r)."""
    inner = peft_model.base_model.model
    for key, tensor in delta.state_dict().items():
        path, local = key.rsplit(".", 1)
        tensor.copy_(getattr(inner.get_submodule(path), local)["default"].weight)
    return len(delta.state_dict())


def memory_worker(args: argparse.Namespace) -> None:
    """Child process: load one side, train ``memory_steps`` steps, print its peaks as JSON."""
    import peft  # noqa: F401  (same imports on both sides)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    model = attach_ours(args)[0] if args.memory_worker == "ours" else attach_peft(args)
    step = common.train_fn(model, common.make_batch(args, device), [])
    print_training_peak(step, device, args.memory_steps)


def measure_memory(argv: list[str], checkpoint: str) -> dict[str, list[dict[str, int]]]:
    results: dict[str, list[dict[str, int]]] = {"ours": [], "peft": []}
    for side in ["ours", "peft", "peft", "ours"]:
        command = [sys.executable, str(Path(__file__).resolve()), *argv]
        command += ["--checkpoint", checkpoint, "--memory-worker", side]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {side} failed:\n{done.stderr[-3000:]}")
        results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def run(args: argparse.Namespace, argv: list[str]) -> tuple[list[common.Figure], list[str]]:
    device = torch.device(args.device)
    peft_model = attach_peft(args)
    ours, delta = attach_ours(args)
    copied = copy_from_peft(peft_model, delta)
    ids = common.make_batch(args, device)
    fwd = {"ours": common.forward_fn(ours, ids), "peft": common.forward_fn(peft_model, ids)}
    out = {name: fn() for name, fn in fwd.items()}
    checks = [
        f"{copied} LoRA factors copied from PEFT; max |logits ours - PEFT| = "
        f"{common.max_diff(out['ours'], out['peft']):.3g}",
    ]
    print(f"check: {checks[0]}")
    t_fwd = common.timed_phase("QLoRA forward (no_grad)", fwd, args, device)
    losses: dict[str, list[torch.Tensor]] = {"ours": [], "peft": []}
    train = {
        side: common.train_fn(m, ids, losses[side])
        for side, m in [("ours", ours), ("peft", peft_model)]
    }
    t_train = common.timed_phase("QLoRA train step (fwd + bwd + AdamW)", train, args, device)
    gap = max(abs(a.item() - b.item()) for a, b in zip(losses["ours"], losses["peft"]))
    checks.append(f"after {len(losses['ours'])} train steps: max |loss ours - PEFT| = {gap:.3g}")
    print(f"check: {checks[-1]}")
    figures = [
        common.timed_figure("QLoRA forward, ours / PEFT", t_fwd, "ours", "peft", GOAL),
        common.timed_figure("QLoRA train step, ours / PEFT", t_train, "ours", "peft", GOAL),
    ]
    del peft_model, ours, delta, train
    mem = measure_memory(argv, args.checkpoint)
    what_memory = "CUDA allocated" if device.type == "cuda" else "RSS"
    for key, what in [
        ("peak", f"peak {what_memory} in training"),
        ("before", f"{what_memory} after attach"),
    ]:
        value = {side: timing.median([r[key] / MIB for r in runs]) for side, runs in mem.items()}
        runs = " / ".join(", ".join(f"{r[key] / MIB:.0f}" for r in mem[side]) for side in mem)
        figures.append(
            common.Figure(
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


def environment(args: argparse.Namespace) -> list[str]:
    import bitsandbytes
    import peft
    import transformers

    return [
        f"date: {timing.utc_now()}",
        f"device: {args.device} - {device_name(torch.device(args.device))}; "
        f"torch threads: {args.threads}",
        f"torch {torch.__version__}, transformers {transformers.__version__}, peft "
        f"{peft.__version__}, bitsandbytes {bitsandbytes.__version__}, deltahooks "
        f"{dh.__version__} ({timing.git_commit()})",
        f"workload: Llama hidden={args.hidden} layers={args.layers} intermediate="
        f"{args.intermediate} heads={args.heads} vocab={args.vocab} in NF4 (compute {args.dtype}), "
        f"batch {args.batch} x {args.seq} tokens; LoRA r={args.rank} alpha={args.alpha:g} on "
        "all 7 linears",
        f"timing: {args.warmup} warm-up + {args.rounds} interleaved rounds; ratio = median of "
        "per-round ratios",
    ]


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.memory_worker:
        memory_worker(args)
        return
    torch.set_num_threads(args.threads)
    env = environment(args)
    print("\n".join(env))
    with tempfile.TemporaryDirectory() as folder:
        args.checkpoint = folder
        save_checkpoint(args, folder)
        figures, checks = run(args, argv)
    table = markdown_table(figures)
    text = "\n".join(
        [
            "# deltahooks LoRA vs PEFT QLoRA (NF4 base)",
            "",
            *(f"- {line}" for line in env),
            "",
            table,
            "",
            *(f"- {f.name}: {f.notes}" for f in figures if f.notes),
            *(f"- {line}" for line in checks),
            "",
        ]
    )
    print("\n" + table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
