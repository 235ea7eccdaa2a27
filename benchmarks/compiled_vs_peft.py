"""torch.compile'd LoRA train step, deltahooks vs PEFT: same model, same factors, interleaved.

Why: hooks must not cost anything once compiled. Both models (the reference Llama of
``lora_vs_peft.py``, identical LoRA factors) are wrapped in ``torch.compile`` (inductor),
compiled during warm-up, then timed alternately. Goal: ours / PEFT <= 1.00.

Usage:
    python benchmarks/compiled_vs_peft.py           # reference workload (compiling takes minutes)
    python benchmarks/compiled_vs_peft.py --quick   # tiny smoke run
    python benchmarks/compiled_vs_peft.py --device cuda --dtype bfloat16

Takes the shape flags of ``lora_vs_peft.py``; writes ``benchmarks/out/compiled_vs_peft.md``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import lora_vs_peft as bench
from _method_vs_peft import markdown_table

GOAL = 1.00


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    args = bench.parse_args(argv)
    args.warmup = max(args.warmup, 4)  # the first steps compile and recompile (fwd, bwd, optimizer)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = bench.DTYPES[args.dtype]
    base = bench.build_base(args, device, dtype)
    ours_model, peft_source = copy.deepcopy(base), copy.deepcopy(base)
    del base
    delta = bench.attach_ours(ours_model, args)
    peft_model = bench.attach_peft(peft_source, args)
    bench.copy_lora_into_peft(delta, peft_model)
    ours_model.train()
    peft_model.train()
    ids = bench.make_batch(args, device)
    losses: dict[str, list[torch.Tensor]] = {"ours": [], "peft": []}
    cases = {
        "ours": bench.train_fn(torch.compile(ours_model), ids, losses["ours"]),
        "peft": bench.train_fn(torch.compile(peft_model), ids, losses["peft"]),
    }
    print("\n".join(bench.environment(args, device)))
    print("compiling both sides during warm-up (inductor) ...", flush=True)
    phase = bench.timed_phase("compiled LoRA train step", cases, args, device)
    loss_gap = max(
        bench.max_diff(a, b) for a, b in zip(losses["ours"], losses["peft"], strict=True)
    )
    print(
        f"check: max |loss ours - PEFT| over {len(losses['ours'])} compiled steps = {loss_gap:.3g}"
    )
    figure = bench.timed_figure(
        "compiled LoRA train step, ours / PEFT", phase, "ours", "peft", GOAL
    )
    table = markdown_table([figure])
    print(f"\n{figure.name}: ratio {figure.ratio:.3f}, goal <= {GOAL}, {figure.verdict}")
    print(f"  {figure.notes}\n\n{table}")
    out = args.out.with_name("compiled_vs_peft.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    header = "\n".join(f"- {line}" for line in bench.environment(args, device))
    out.write_text(f"# compiled LoRA train step, deltahooks vs PEFT\n\n{header}\n\n{table}\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
