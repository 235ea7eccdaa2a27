"""deltahooks IA3 and LN tuning vs PEFT's: same model, same values, one process, interleaved.

The workload and method are those of ``lora_vs_peft.py`` (its Llama-shaped reference
model, batch and helpers): both sides run alternately (A B, B A, ...) on identical copies
of one randomly initialised Llama, each figure is the median of per-round ratios, and
both sides carry the *same* non-identity values, with the script printing how far their
outputs differ so the timings compare equal work.

- IA3: PEFT's Llama targets, ``k_proj``, ``v_proj`` (outputs scaled) and ``down_proj``
  (input scaled, ``feedforward``), vectors random around one on both sides.
- LN tuning: every norm layer (2 per decoder layer and the final one). Ours reads
  ``weight + Δw`` through a parametrization; PEFT runs a trained copy of each layer,
  here set to base + Δw.

Figures, per method: forward (eval, no_grad) ours / PEFT and ours / frozen base; train
step (LM loss fwd + bwd + AdamW, no weight decay, so both sides take the same steps)
ours / PEFT; merged forward ours / base; peak memory while training, ours / PEFT, each
side in a fresh subprocess (CPU: peak RSS; CUDA: ``max_memory_allocated``).

Usage:
    python benchmarks/ia3_lntuning_vs_peft.py            # reference workload (~3 min, 2 cores)
    python benchmarks/ia3_lntuning_vs_peft.py --quick    # tiny smoke run
    python benchmarks/ia3_lntuning_vs_peft.py --methods ln_tuning --profile 3
    python benchmarks/ia3_lntuning_vs_peft.py --device cuda --dtype bfloat16

The markdown table is also written to ``benchmarks/out/ia3_lntuning_vs_peft.md``.
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

IA3_TARGETS, IA3_FEEDFORWARD = ["k_proj", "v_proj", "down_proj"], ["down_proj"]


def attach_ours(method: str, model: nn.Module, args: argparse.Namespace) -> dh.Delta:
    """Non-identity values on our side (a delta left at its start would hide a wrong path)."""
    if method == "ia3":
        return dh.attach(
            model, dh.IA3(targets=IA3_TARGETS, feedforward=IA3_FEEDFORWARD, init="random")
        )
    delta = dh.attach(model, dh.LNTuning())
    generator = torch.Generator().manual_seed(args.seed + 2)
    with torch.no_grad():
        for tensor in delta.parameters():
            noise = torch.randn(tensor.shape, generator=generator) * 0.1
            tensor.copy_(noise.to(device=tensor.device, dtype=tensor.dtype))
    return delta


def attach_peft(method: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """PEFT's model; its trainable tensors kept in the model dtype (no fp32 upcast), as ours."""
    from peft import IA3Config, LNTuningConfig, get_peft_model

    if method == "ia3":
        config = IA3Config(
            target_modules=IA3_TARGETS, feedforward_modules=IA3_FEEDFORWARD, init_ia3_weights=True
        )
    else:
        config = LNTuningConfig()  # PEFT's Llama default: every norm layer
    return get_peft_model(model, config, autocast_adapter_dtype=False)


@torch.no_grad()
def copy_into_peft(method: str, delta: dh.Delta, peft_model: nn.Module) -> int:
    """Give PEFT our values: IA3 vectors reshaped to its layout; LN copies at base + Δ."""
    pairs = peft_tensors(delta, peft_model)
    for layer, local, tensor in pairs:
        if method == "ia3":
            target = layer.ia3_l["default"]
            target.copy_(tensor.view_as(target))
        else:
            attr = local.removeprefix("ln_")  # ln_weight -> weight
            base = getattr(layer.base_layer, attr)
            getattr(layer.ln_tuning_layers["default"], attr).copy_(base + tensor)
    return len(pairs)


def workload(args: argparse.Namespace) -> str:
    return (
        f"IA3 on {','.join(IA3_TARGETS)} (feedforward {','.join(IA3_FEEDFORWARD)}); "
        f"LN tuning on every norm ({2 * args.layers + 1} layers)"
    )


BENCH = MethodBench(
    title="deltahooks IA3 and LN tuning vs PEFT",
    doc=__doc__,
    script=__file__,
    labels={"ia3": "IA3", "ln_tuning": "LN tuning"},
    attach_ours=attach_ours,
    attach_peft=attach_peft,
    share=copy_into_peft,
    workload=workload,
)

if __name__ == "__main__":
    main(BENCH)
