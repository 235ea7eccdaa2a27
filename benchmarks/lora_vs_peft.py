"""deltahooks LoRA vs PEFT LoRA: same model, same LoRA weights, one process, interleaved.

Why this shape: a release claim such as "forward is 3 % faster than PEFT" is smaller than
the drift of a shared machine over a few minutes, so both sides run alternately (A B, B A,
...) on two identical copies of one randomly initialised Llama, and each figure is the
median of per-round ratios. Both copies carry the *same* non-zero LoRA factors and the
script prints how far their outputs differ, so the timings compare equal work.

Figures (goals in brackets):
  1. LoRA forward, eval + no_grad, ours / PEFT            [<= 0.97]
  2. LoRA train step (LM loss fwd + bwd + AdamW), ours / PEFT  [<= 0.90]
     (with the floor: the frozen base's fwd + bwd without any LoRA, / PEFT, the bound)
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
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import _timing as timing  # benchmarks/ is sys.path[0] when run as a script
import torch
from _method_vs_peft import (  # also what scaling.py and compiled_vs_peft.py use from here
    DTYPES,
    MIB,
    SHAPES,
    Figure,
    add_shape_flags,
    base_parser,
    build_base,
    dh,  # deltahooks, imported (or found beside us) by _method_vs_peft
    fill_shapes,
    forward_fn,
    make_batch,
    max_diff,
    measure_memory,
    memory_runs_note,
    print_training_peak,
    profile_forwards,
    report,
    timed_figure,
    timed_phase,
    timed_training,
    train_fn,
    trainable,
)
from _method_vs_peft import environment as shared_environment
from torch import nn

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "lora_vs_peft.md"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GOALS = {"forward": 0.97, "train": 0.90, "merged": 1.01, "memory": 1.00, "saved": 0.82}
GOALS["dropout_memory"] = 0.90  # Performance II: peak training memory with dropout


# --------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    add_shape_flags(parser, SHAPES)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--dropout", type=float, default=0.0, help="LoRA dropout (both sides)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess figure")
    parser.add_argument(
        "--profile", type=int, default=0, metavar="N", help="profile N forwards of each side"
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table path")
    parser.add_argument("--memory-worker", choices=["ours", "peft"], help=argparse.SUPPRESS)
    return fill_shapes(parser, parser.parse_args(argv), SHAPES)


def attach_ours(model: nn.Module, args: argparse.Namespace) -> dh.Delta:
    """Both factors random (``init="random"``): a zero B would hide a wrong B path."""
    spec = dh.LoRA(
        targets=TARGETS, r=args.rank, alpha=args.alpha, dropout=args.dropout, init="random"
    )
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
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=args.dropout,
        target_modules=list(TARGETS),
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


def environment(args: argparse.Namespace, device: torch.device) -> list[str]:
    workload = (
        f"LoRA r={args.rank} alpha={args.alpha:g} dropout={args.dropout:g} on {','.join(TARGETS)}"
    )
    return shared_environment(args, device, workload)


# ------------------------------------------------------------------------ memory
def memory_worker(args: argparse.Namespace) -> None:
    """Child process: build one side, train ``memory_steps`` steps, print its peak as JSON."""
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
    print_training_peak(train_fn(model, ids, []), device, args.memory_steps)


# -------------------------------------------------------------------------- main
def floor_step(base: nn.Module, ids: torch.Tensor) -> Callable[[], None]:
    """A train step's work that no LoRA can avoid: the frozen base's forward and the
    backward through every layer (the embedding output requires grad, so layer 0 too),
    no delta, no optimizer. ``ours / PEFT`` cannot go below ``floor / PEFT``."""
    floor = copy.deepcopy(base).requires_grad_(False).train()
    floor.get_input_embeddings().register_forward_hook(lambda m, i, out: out.requires_grad_())

    def run() -> None:
        floor(input_ids=ids, labels=ids).loss.backward()

    return run


def saved_for_backward(model: nn.Module, ids: torch.Tensor) -> int:
    """Bytes of the distinct storages autograd keeps for one training forward's backward."""
    storages: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    model.zero_grad(set_to_none=True)
    model.eval()
    return sum(storages.values())


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

    # 2. what autograd keeps for backward (counted, not timed: exact on any machine)
    kept = {
        name: saved_for_backward(m, ids) for name, m in [("ours", ours_model), ("peft", peft_model)]
    }
    check(
        f"bytes saved for backward: ours {kept['ours'] / MIB:.1f} MiB, PEFT {kept['peft'] / MIB:.1f} MiB"
    )

    # 3. train step
    t_train, after = timed_training(
        "LoRA train step (LM loss fwd + bwd + AdamW)",
        {"ours": ours_model, "peft": peft_model},
        lambda side, model, losses: train_fn(model, ids, losses),
        fwd,
        args,
        device,
        check,
    )

    # 3b. the bound: no LoRA at all, but gradients through every layer (what any LoRA on
    #     every layer must at least pay), against PEFT's step (on a copy: the checks below
    #     compare the trained models)
    t_floor = timed_phase(
        "train step floor: frozen base fwd + bwd to the embeddings, no LoRA, vs PEFT's step",
        {
            "floor": floor_step(base, ids),
            "peft": train_fn(copy.deepcopy(peft_model).train(), ids, []),
        },
        args,
        device,
    )

    # 4. merged forward against the hook-free base
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
        timed_figure("train step floor without LoRA, floor / PEFT", t_floor, "floor", "peft", None),
        Figure(
            "bytes autograd saves for backward, ours / PEFT",
            kept["ours"] / MIB,
            kept["peft"] / MIB,
            kept["ours"] / kept["peft"],
            GOALS["saved"] if args.dropout else None,  # Performance II: with dropout
            "MiB",
            "one training forward; unique storages",
        ),
        timed_figure(
            "merged forward, ours / base", t_merged, "ours merged", "base", GOALS["merged"]
        ),
        timed_figure(
            "merged forward, PEFT / base (reference)", t_merged, "peft merged", "base", None
        ),
    ]

    # 5. peak memory, fresh processes
    if not args.no_memory:
        what = "CUDA allocated" if device.type == "cuda" else "RSS"
        mem = measure_memory(__file__, argv)
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
                GOALS["dropout_memory"] if args.dropout else GOALS["memory"],
                "MiB",
                memory_runs_note(mem),
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
    report("deltahooks LoRA vs PEFT", env, figures, checks, args.out)


if __name__ == "__main__":
    main()
