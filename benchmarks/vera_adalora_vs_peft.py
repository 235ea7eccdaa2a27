"""deltahooks VeRA and AdaLoRA vs PEFT's: same model, same values, one process, interleaved.

The workload and method are those of ``lora_vs_peft.py`` (its Llama-shaped reference
model, batch and helpers): both sides run alternately (A B, B A, ...) on identical copies
of one randomly initialised Llama, each figure is the median of per-round ratios. Both
sides carry the *same* non-identity values: PEFT's adapter (``init_weights=False`` /
``init_lora_weights=False``) is saved and loaded into ours with ``dh.load_peft``, and the
script prints how far their outputs differ, so the timings compare equal work.

- VeRA: PEFT's Llama targets ``q_proj``, ``v_proj``, ``r=256`` (PEFT's default).
- AdaLoRA: ``q_proj``, ``v_proj``, ``init_r=12``; a train step is the LM loss plus the
  orthogonality regulariser (PEFT adds it inside its forward), backward, AdamW, and the
  rank allocator's update (PEFT: ``update_and_allocate``), as the AdaLoRA loop runs it.

Figures, per method: forward (eval, no_grad) ours / PEFT and ours / frozen base; train
step ours / PEFT; merged forward ours / base; peak memory while training, ours / PEFT,
each side in a fresh subprocess (CPU: peak RSS; CUDA: ``max_memory_allocated``).

Usage:
    python benchmarks/vera_adalora_vs_peft.py --small     # the recorded run (< 2 min, 2 cores)
    python benchmarks/vera_adalora_vs_peft.py             # lora_vs_peft's reference workload
    python benchmarks/vera_adalora_vs_peft.py --quick     # tiny smoke run
    python benchmarks/vera_adalora_vs_peft.py --methods vera --device cuda

The markdown table is also written to ``benchmarks/out/vera_adalora_vs_peft.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path

import _timing as timing  # benchmarks/ is sys.path[0] when run as a script
import torch
from lora_vs_peft import (
    DTYPES,
    MIB,
    SHAPES,
    Figure,
    build_base,
    device_name,
    forward_fn,
    make_batch,
    markdown_table,
    max_diff,
    timed_figure,
    timed_phase,
    trainable,
)
from torch import nn

try:
    import deltahooks as dh
except ModuleNotFoundError:  # a checkout without `pip install -e .`: use the package beside us
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import deltahooks as dh

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "out" / "vera_adalora_vs_peft.md"
METHODS = ("vera", "adalora")
TARGETS = ["q_proj", "v_proj"]
LABELS = {"vera": "VeRA", "adalora": "AdaLoRA"}
GOALS = {"forward": 1.00, "train": 1.00, "merged": 1.01, "memory": 1.00}
SMALL = {"hidden": 256, "layers": 4, "intermediate": 688, "heads": 4, "vocab": 8000, "seq": 64}
TOTAL_STEP = 10_000  # AdaLoRA's schedule length: the timed steps stay in its budget phase


# --------------------------------------------------------------------------- setup
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, 2 rounds: smoke run")
    parser.add_argument("--small", action="store_true", help=f"smaller model: {SMALL}")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset")
    for name, (ref, quick) in SHAPES.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, type=int, default=None, help=f"default {ref} ({quick} quick)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true", help="skip the subprocess figure")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown table path")
    parser.add_argument(
        "--memory-worker", nargs=2, metavar=("METHOD", "SIDE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args(argv)
    for name, (ref, quick) in SHAPES.items():
        if getattr(args, name) is None:
            small = SMALL.get(name, ref) if args.small else ref
            setattr(args, name, quick if args.quick else small)
    args.methods = [m for m in args.methods.split(",") if m]
    if not set(args.methods) <= set(METHODS) or not args.methods:
        parser.error(f"--methods takes a comma-separated subset of {list(METHODS)}")
    return args


def peft_config(method: str, identity: bool):
    """PEFT's config; ``identity=False`` starts every trained tensor away from zero."""
    from peft import AdaLoraConfig, VeraConfig

    if method == "vera":
        return VeraConfig(target_modules=TARGETS, r=256, init_weights=identity)
    return AdaLoraConfig(
        target_modules=TARGETS,
        init_r=12,
        target_r=8,
        total_step=TOTAL_STEP,
        lora_alpha=32,
        init_lora_weights=identity,
        task_type="CAUSAL_LM",  # so PEFT's forward adds the orthogonality term to the loss
    )


def attach_peft(method: str, model: nn.Module, identity: bool = False) -> nn.Module:
    """PEFT's model; its trainable tensors kept in the model dtype (no fp32 upcast), as ours.

    AdaLoRA's random start (every factor standard normal) is scaled down in ``Λ``, so the
    update stays small next to ``W`` as after real training; at full size it swamps the
    attention scores and float rounding alone then reorders near-tied triplets.
    """
    from peft import get_peft_model

    peft_model = get_peft_model(model, peft_config(method, identity), autocast_adapter_dtype=False)
    if method == "adalora" and not identity:
        with torch.no_grad():
            for name, tensor in peft_model.named_parameters():
                if "lora_E" in name:
                    tensor.mul_(0.01)
    return peft_model


def ours_from_peft(peft_model: nn.Module, model: nn.Module) -> dh.Delta:
    """Our delta with PEFT's exact values, through its own files and ``dh.load_peft``."""
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        return dh.load_peft(model, directory)


class Step:
    """One training step of a method, for either side (the AdaLoRA loop has more to do)."""

    def __init__(self, method: str, side: str, model: nn.Module, delta: dh.Delta | None):
        self.method, self.side, self.model, self.delta = method, side, model, delta
        self.count = 0
        self.allocator = None
        if method == "adalora" and side == "ours":
            self.allocator = dh.adalora_allocator(delta)

    def loss(self, ids: torch.Tensor) -> torch.Tensor:
        loss = self.model(input_ids=ids, labels=ids).loss  # PEFT's AdaLoRA adds its reg here
        if self.allocator is not None:
            loss = loss + self.allocator.orthogonality_loss()
        return loss

    def after_backward(self) -> None:
        if self.method != "adalora":
            return
        self.count += 1
        if self.allocator is not None:
            self.allocator.update_and_allocate(self.count)
        else:
            self.model.base_model.update_and_allocate(self.count)


def train_fn(step: Step, ids: torch.Tensor, losses: list[torch.Tensor]) -> Callable[[], None]:
    """One AdamW step (no weight decay), the allocator's update between step and zero_grad."""
    optimizer = torch.optim.AdamW(trainable(step.model), lr=1e-4, weight_decay=0.0)

    def run() -> None:
        loss = step.loss(ids)
        loss.backward()
        optimizer.step()
        step.after_backward()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())

    return run


def environment(args: argparse.Namespace, device: torch.device) -> list[str]:
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
        f"batch {args.batch} x {args.seq} tokens, {args.dtype}; on {','.join(TARGETS)}: "
        "VeRA r=256; AdaLoRA init_r=12 target_r=8 (budget phase)",
        f"timing: {args.warmup} warm-up + {args.rounds} interleaved rounds; "
        "ratio = median of per-round ratios",
    ]


# ------------------------------------------------------------------------ memory
def memory_worker(args: argparse.Namespace) -> None:
    """Child process: build one side of one method, train, print its peak as JSON."""
    method, side = args.memory_worker
    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    model = build_base(args, device, DTYPES[args.dtype])
    delta = None
    if side == "ours":  # the same shapes; values do not change memory
        if method == "vera":
            spec = dh.VeRA(targets=TARGETS, r=256, init="random")
        else:
            spec = dh.AdaLoRA(
                targets=TARGETS,
                init_r=12,
                target_r=8,
                total_step=TOTAL_STEP,
                alpha=32,
                init="random",
            )
        delta = dh.attach(model, spec)
    else:
        model = attach_peft(method, model)
    model.train()
    step = train_fn(Step(method, side, model, delta), make_batch(args, device), [])
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


def measure_memory(method: str, argv: list[str]) -> dict[str, list[dict[str, int]]]:
    """Each side twice, interleaved, each time in a fresh interpreter."""
    results: dict[str, list[dict[str, int]]] = {"ours": [], "peft": []}
    for side in ["ours", "peft", "peft", "ours"]:
        command = [sys.executable, str(Path(__file__).resolve()), *argv]
        command += ["--memory-worker", method, side]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory worker {method} {side} failed:\n{done.stderr[-3000:]}")
        results[side].append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


# -------------------------------------------------------------------------- main
def run_method(
    method: str, base: nn.Module, args: argparse.Namespace, argv: list[str]
) -> tuple[list[Figure], list[str]]:
    device = torch.device(args.device)
    label = LABELS[method]
    ours_model = copy.deepcopy(base)
    peft_model = attach_peft(method, copy.deepcopy(base))
    delta = ours_from_peft(peft_model, ours_model)
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
    check(f"trainable params ours {n_ours}, PEFT {n_peft}")
    check(
        f"max |logits ours - PEFT| = {max_diff(out['ours'], out['peft']):.3g} "
        f"(effect |ours - base| = {max_diff(out['ours'], out['base']):.3g})"
    )
    if n_ours != n_peft:
        raise SystemExit(f"{label}: trainable parameter counts differ: not the same delta")

    t_fwd = timed_phase(f"{label} forward (eval, no_grad)", fwd, args, device)

    losses: dict[str, list[torch.Tensor]] = {"ours": [], "peft": []}
    ours_model.train()
    peft_model.train()
    train = {
        "ours": train_fn(Step(method, "ours", ours_model, delta), ids, losses["ours"]),
        "peft": train_fn(Step(method, "peft", peft_model, None), ids, losses["peft"]),
    }
    t_train = timed_phase(f"{label} train step (fwd + bwd + AdamW)", train, args, device)
    ours_model.eval()
    peft_model.eval()
    loss_gap = max(abs(a.item() - b.item()) for a, b in zip(losses["ours"], losses["peft"]))
    after = {name: fwd[name]() for name in ("ours", "peft")}
    check(
        f"after {len(losses['ours'])} train steps: max |loss ours - PEFT| = {loss_gap:.3g}, "
        f"max |logits ours - PEFT| = {max_diff(after['ours'], after['peft']):.3g}"
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

    figures = [
        timed_figure(f"{label} forward, ours / PEFT", t_fwd, "ours", "peft", GOALS["forward"]),
        timed_figure(f"{label} forward, ours / base (no delta)", t_fwd, "ours", "base", None),
        timed_figure(f"{label} train step, ours / PEFT", t_train, "ours", "peft", GOALS["train"]),
        timed_figure(
            f"{label} merged forward, ours / base", t_merged, "ours merged", "base", GOALS["merged"]
        ),
    ]
    if not args.no_memory:
        what = "CUDA allocated" if device.type == "cuda" else "RSS"
        mem = measure_memory(method, argv)
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
                GOALS["memory"],
                "MiB",
                "runs "
                + " / ".join(", ".join(f"{r['peak'] / MIB:.0f}" for r in mem[s]) for s in mem)
                + " MiB",
            )
        )
    return figures, checks


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    warnings.filterwarnings("ignore")  # PEFT's notes on fan_in_fan_out, r, unmerge
    if args.memory_worker:
        memory_worker(args)
        return
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    env = environment(args, device)
    print("\n".join(env))
    base = build_base(args, device, DTYPES[args.dtype])
    figures: list[Figure] = []
    checks: list[str] = []
    for method in args.methods:
        more_figures, more_checks = run_method(method, base, args, argv)
        figures += more_figures
        checks += more_checks

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
            "# deltahooks VeRA and AdaLoRA vs PEFT",
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
