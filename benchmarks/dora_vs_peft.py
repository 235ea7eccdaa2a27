"""deltahooks DoRA (``dh.LoRA(dora=True)``) vs PEFT's ``use_dora``: same model, same values,
one process, interleaved.

The workload and method are those of ``lora_vs_peft.py`` (its Llama-shaped reference model,
batch and helpers): both sides run alternately (A B, B A, ...) on identical copies of one
randomly initialised Llama, each figure is the median of per-round ratios, and both sides
carry the *same* non-identity values (random A and B, magnitudes moved off ``‖W + sBA‖``),
with the script printing how far their outputs differ so the timings compare equal work.
DoRA on every linear layer of the decoder (PEFT's all-linear set for Llama).

Figures: forward (eval, no_grad) ours / PEFT and ours / frozen base; train step (LM loss
fwd + bwd + AdamW, no weight decay) ours / PEFT; merged forward ours / base; peak memory
while training, ours / PEFT, each side in a fresh subprocess (CPU: peak RSS; CUDA:
``max_memory_allocated``).

Usage:
    python benchmarks/dora_vs_peft.py            # reference workload (2 cores: a few minutes)
    python benchmarks/dora_vs_peft.py --quick    # tiny smoke run
    python benchmarks/dora_vs_peft.py --hidden 256 --layers 4 --vocab 8000   # < 2 minutes
    python benchmarks/dora_vs_peft.py --device cuda --dtype bfloat16

The markdown table is also written to ``benchmarks/out/dora_vs_peft.md``.
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
from lora_vs_peft import TARGETS
from torch import nn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)


def attach_ours(method: str, model: nn.Module, args: argparse.Namespace) -> dh.Delta:
    """Random A and B (kept small next to W, as after training), magnitudes off ‖W + sBA‖."""
    spec = dh.LoRA(targets=TARGETS, r=args.rank, alpha=args.alpha, dora=True, init="random")
    delta = dh.attach(model, spec)
    generator = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        for name, tensor in delta.named_parameters():
            if name.endswith("lora_B"):
                tensor.mul_(0.1)
            elif name.endswith("lora_magnitude_vector"):
                noise = 1 + 0.1 * torch.randn(tensor.shape, generator=generator)
                tensor.mul_(noise.to(device=tensor.device, dtype=tensor.dtype))
    return delta


def attach_peft(method: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """PEFT's DoRA model; adapters kept in the model dtype (no fp32 upcast), as ours."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha,
        lora_dropout=0.0,
        target_modules=list(TARGETS),
        use_dora=True,
    )
    return get_peft_model(model, config, autocast_adapter_dtype=False)


@torch.no_grad()
def copy_into_peft(method: str, delta: dh.Delta, peft_model: nn.Module) -> int:
    """Give PEFT exactly our tensors: same names and layouts."""
    pairs = peft_tensors(delta, peft_model)
    for layer, local, tensor in pairs:
        target = getattr(layer, local)["default"].weight  # lora_magnitude_vector too
        target.copy_(tensor.view_as(target))
    return len(pairs)


BENCH = MethodBench(
    title="deltahooks DoRA vs PEFT",
    doc=__doc__,
    script=__file__,
    labels={"dora": "DoRA"},
    attach_ours=attach_ours,
    attach_peft=attach_peft,
    share=copy_into_peft,
    workload=lambda args: f"DoRA r={args.rank} alpha={args.alpha:g} on {','.join(TARGETS)}",
    add_arguments=add_arguments,
)

if __name__ == "__main__":
    main(BENCH)
