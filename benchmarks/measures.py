"""What a row of the table measures: ``(benchmark, method, base, args, argv) -> (figures,
checks)``. Each measure checks that both sides compute the same thing before it times them.

- :func:`compare_with_peft`: forward, train step, merged forward and peak memory (every
  weight-space method);
- :func:`lora_with_floor`: the same for LoRA plus the train-step floor (no LoRA at all),
  the bytes autograd saves, PEFT merged and the memory growth;
- :func:`compiled_train_step`: the ``torch.compile``d train step;
- :func:`prompt_forward_and_train`: prompt / prefix tuning (no merge, no memory).
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Callable

import torch
from torch import nn

from . import _timing as timing
from .harness import (
    MIB,
    forward_fn,
    make_batch,
    max_diff,
    measure_memory,
    memory_kind,
    peak_figure,
    profile_forwards,
    timed_figure,
    timed_phase,
    timed_training,
    train_fn,
    trainable,
)
from .report import Figure
from .rows import Benchmark, Method, Result

GOALS = {"forward": 1.00, "train": 1.00, "merged": 1.01, "memory": 1.00}
LORA_GOALS = {"forward": 0.97, "train": 0.90, "merged": 1.01, "memory": 1.00, "saved": 0.82}
LORA_GOALS["dropout_memory"] = 0.90  # Performance II: peak training memory with dropout
COMPILED_GOAL = 1.00


def parameter_counts(*models: nn.Module) -> list[int]:
    return [sum(p.numel() for p in trainable(m)) for m in models]


def compare_with_peft(
    benchmark: Benchmark, method: Method, base: nn.Module, args: argparse.Namespace, argv: list[str]
) -> Result:
    """Parity checks, interleaved forward / train / merged timings, peak memory."""
    device = torch.device(args.device)
    label = method.label
    ours_model = copy.deepcopy(base)
    delta, peft_model, copied = method.pair(ours_model, copy.deepcopy(base), args)
    n_ours, n_peft = parameter_counts(ours_model, peft_model)
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
    if args.profile:
        profile_forwards({"ours": fwd["ours"], "peft": fwd["peft"]}, args.profile)

    t_train, after = timed_training(
        f"{label} {method.train_title}",
        {"ours": ours_model, "peft": peft_model},
        lambda side, model, losses: method.train_step(
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
    if method.check_unmerge:
        check(f"after unmerge, max |logits diff| ours {max_diff(fwd['ours'](), after['ours']):.3g}")

    figures = [
        timed_figure(f"{label} forward, ours / PEFT", t_fwd, "ours", "peft", GOALS["forward"]),
        timed_figure(f"{label} forward, ours / base (no delta)", t_fwd, "ours", "base", None),
    ]
    if method.peft_reference:
        figures.append(
            timed_figure(f"{label} forward, PEFT / base (reference)", t_fwd, "peft", "base", None)
        )
    figures += [
        timed_figure(f"{label} train step, ours / PEFT", t_train, "ours", "peft", GOALS["train"]),
        timed_figure(
            f"{label} merged forward, ours / base", t_merged, "ours merged", "base", GOALS["merged"]
        ),
    ]
    if not args.no_memory:
        what = memory_kind(device)
        mem = measure_memory(argv, method.name)
        for side, runs in mem.items():
            peaks = ", ".join(f"{r['peak'] / MIB:.1f}" for r in runs)
            print(f"  {label} {side:<5} peak {what} MiB: {peaks}")
        name = f"{label} peak {what} in training, ours / PEFT"
        figures.append(peak_figure(name, mem, GOALS["memory"]))
    return figures, checks


# --------------------------------------------------------------------------- LoRA
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


def lora_with_floor(
    benchmark: Benchmark, method: Method, base: nn.Module, args: argparse.Namespace, argv: list[str]
) -> Result:
    """LoRA's phases: forward, saved bytes, train step and its floor, merged (ours and
    PEFT's), peak memory and its growth over setup."""
    device = torch.device(args.device)
    ours_model = copy.deepcopy(base)
    delta, peft_model, copied = method.pair(ours_model, copy.deepcopy(base), args)
    n_ours, n_peft = parameter_counts(ours_model, peft_model)
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

    goals = LORA_GOALS
    figures = [
        timed_figure("LoRA forward, ours / PEFT", t_fwd, "ours", "peft", goals["forward"]),
        timed_figure("LoRA forward, ours / base (no LoRA)", t_fwd, "ours", "base", None),
        timed_figure("LoRA train step, ours / PEFT", t_train, "ours", "peft", goals["train"]),
        timed_figure("train step floor without LoRA, floor / PEFT", t_floor, "floor", "peft", None),
        Figure(
            "bytes autograd saves for backward, ours / PEFT",
            kept["ours"] / MIB,
            kept["peft"] / MIB,
            kept["ours"] / kept["peft"],
            goals["saved"] if args.dropout else None,  # Performance II: with dropout
            "MiB",
            "one training forward; unique storages",
        ),
        timed_figure(
            "merged forward, ours / base", t_merged, "ours merged", "base", goals["merged"]
        ),
        timed_figure(
            "merged forward, PEFT / base (reference)", t_merged, "peft merged", "base", None
        ),
    ]

    # 5. peak memory, fresh processes
    if not args.no_memory:
        what = memory_kind(device)
        mem = measure_memory(argv, method.name)
        print(f"\npeak {what} while training {args.memory_steps} steps (fresh process each)")
        for side, runs in mem.items():
            peaks = ", ".join(f"{r['peak'] / MIB:.1f}" for r in runs)
            grows = ", ".join(f"{(r['peak'] - r['before']) / MIB:.1f}" for r in runs)
            print(f"  {side:<5} peak MiB: {peaks}   growth over setup MiB: {grows}")
        goal = goals["dropout_memory"] if args.dropout else goals["memory"]
        figures.append(peak_figure(f"peak {what} in training, ours / PEFT", mem, goal))
        grow = {
            side: timing.median([(r["peak"] - r["before"]) / MIB for r in runs])
            for side, runs in mem.items()
        }
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


def compiled_train_step(
    benchmark: Benchmark, method: Method, base: nn.Module, args: argparse.Namespace, argv: list[str]
) -> Result:
    """Both sides wrapped in ``torch.compile`` (inductor), compiled during warm-up, then
    their train steps timed alternately: hooks must not cost anything once compiled."""
    args.warmup = max(args.warmup, 4)  # the first steps compile and recompile (fwd, bwd, optimizer)
    device = torch.device(args.device)
    ours_model = copy.deepcopy(base)
    _, peft_model, _ = method.pair(ours_model, copy.deepcopy(base), args)
    ours_model.train()
    peft_model.train()
    ids = make_batch(args, device)
    losses: dict[str, list[torch.Tensor]] = {"ours": [], "peft": []}
    cases = {
        "ours": train_fn(torch.compile(ours_model), ids, losses["ours"]),
        "peft": train_fn(torch.compile(peft_model), ids, losses["peft"]),
    }
    print("compiling both sides during warm-up (inductor) ...", flush=True)
    phase = timed_phase("compiled LoRA train step", cases, args, device)
    gap = max(max_diff(a, b) for a, b in zip(losses["ours"], losses["peft"], strict=True))
    check = f"max |loss ours - PEFT| over {len(losses['ours'])} compiled steps = {gap:.3g}"
    print(f"check: {check}")
    name = "compiled LoRA train step, ours / PEFT"
    return [timed_figure(name, phase, "ours", "peft", COMPILED_GOAL)], [check]


def prompt_forward_and_train(
    benchmark: Benchmark, method: Method, base: nn.Module, args: argparse.Namespace, argv: list[str]
) -> Result:
    """Forward and train-step figures of a prompt method, and the checks that both sides
    agree (same logits, same losses); no merge, no memory figure."""
    device = torch.device(args.device)
    title = method.label
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    _, theirs, _ = method.pair(ours, theirs, args)
    ids = make_batch(args, device)
    n_ours, n_peft = parameter_counts(ours, theirs)
    checks = [f"{title}: trainable params ours {n_ours}, PEFT {n_peft}"]
    with torch.no_grad():
        ours_logits, peft_logits = ours(input_ids=ids).logits, theirs(input_ids=ids).logits
        checks.append(
            f"{title}: logits {tuple(ours_logits.shape)} ours, {tuple(peft_logits.shape)} PEFT; "
            f"max |ours - PEFT| = {max_diff(ours_logits, peft_logits):.3g}"
        )
    forward = timed_phase(
        f"{title} forward",
        {
            "ours": forward_fn(ours, ids),
            "peft": forward_fn(theirs, ids),
            "base": forward_fn(base, ids),
        },
        args,
        device,
    )
    figures = [
        timed_figure(f"{title} forward, ours / PEFT", forward, "ours", "peft", None),
        timed_figure(f"{title} forward, ours / base (no delta)", forward, "ours", "base", None),
    ]
    ours.train()
    theirs.train()
    losses: dict[str, list[torch.Tensor]] = {"ours": [], "peft": []}
    train = timed_phase(
        f"{title} train step",
        {
            "ours": train_fn(ours, ids, losses["ours"]),
            "peft": train_fn(theirs, ids, losses["peft"]),
        },
        args,
        device,
    )
    figures.append(timed_figure(f"{title} train step, ours / PEFT", train, "ours", "peft", None))
    steps = len(losses["ours"])
    gap = max(max_diff(a, b) for a, b in zip(losses["ours"], losses["peft"], strict=True))
    checks.append(f"{title}: after {steps} train steps, max |loss ours - PEFT| = {gap:.3g}")
    return figures, checks
