"""deltahooks LoHa and LoKr vs PEFT's: same model, same values, one process, interleaved.

The workload and method are those of ``lora_vs_peft.py`` (its Llama-shaped model, batch
and helpers): both sides run alternately (A B, B A, ...) on identical copies of one
randomly initialised Llama, each figure is the median of per-round ratios, and both sides
carry the *same* non-identity factors (PEFT's ``init_weights=False`` values, copied into
ours), with the script printing how far their outputs differ so the timings compare equal
work. Targets: ``q_proj``, ``v_proj`` (PEFT's Llama default) and ``down_proj``; r=8,
alpha=8 (both methods' defaults).

Ours reads ``W + ΔW`` through a weight site (one matmul per layer); PEFT adds
``F.linear(x, ΔW)`` to the base output (a second matmul over every token).

Figures, per method: forward (eval, no_grad) ours / PEFT and ours / frozen base; train
step (LM loss fwd + bwd + AdamW, no weight decay) ours / PEFT; merged forward ours / base;
peak memory while training, ours / PEFT, each side in a fresh subprocess (CPU: peak RSS;
CUDA: ``max_memory_allocated``).

Usage:
    python benchmarks/loha_lokr_vs_peft.py --hidden 256 --layers 4 --intermediate 688 \
        --vocab 8000 --seq 64 --rounds 5          # the recorded run (< 2 min, 2 cores)
    python benchmarks/loha_lokr_vs_peft.py --quick
    python benchmarks/loha_lokr_vs_peft.py --device cuda --dtype bfloat16

The markdown table is also written to ``benchmarks/out/loha_lokr_vs_peft.md``.
"""

from __future__ import annotations

import argparse

import torch
from _method_vs_peft import (
    MethodBench,
    dh,
    main,
    peft_tensors,
)  # benchmarks/ is sys.path[0] as a script
from torch import nn

TARGETS = ["q_proj", "v_proj", "down_proj"]


def attach_ours(method: str, model: nn.Module, args: argparse.Namespace) -> dh.Delta:
    """Our delta; its values come from PEFT's (``copy_from_peft``) or, alone, stay random."""
    spec = dh.LoHa if method == "loha" else dh.LoKr
    return dh.attach(model, spec(targets=TARGETS, r=8, alpha=8, init="random"))


def attach_peft(method: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """PEFT's model with non-identity factors, kept in the model dtype (no fp32 upcast)."""
    from peft import LoHaConfig, LoKrConfig, get_peft_model

    config_type = LoHaConfig if method == "loha" else LoKrConfig
    config = config_type(target_modules=TARGETS, r=8, alpha=8, init_weights=False)
    return get_peft_model(model, config, autocast_adapter_dtype=False)


@torch.no_grad()
def copy_from_peft(method: str, delta: dh.Delta, peft_model: nn.Module) -> int:
    """Give ours PEFT's values: the tensors have the same names and layouts."""
    pairs = peft_tensors(delta, peft_model)
    for layer, local, tensor in pairs:
        tensor.copy_(getattr(layer, local)["default"])
    return len(pairs)


BENCH = MethodBench(
    title="deltahooks LoHa and LoKr vs PEFT",
    doc=__doc__,
    script=__file__,
    labels={"loha": "LoHa", "lokr": "LoKr"},
    attach_ours=attach_ours,
    attach_peft=attach_peft,
    share=copy_from_peft,
    workload=lambda args: f"LoHa and LoKr (r=8, alpha=8) on {','.join(TARGETS)}",
)

if __name__ == "__main__":
    main(BENCH)
