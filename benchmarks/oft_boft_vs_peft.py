"""deltahooks OFT and BOFT vs PEFT's: same model, same values, one process, interleaved.

The workload and method are those of ``lora_vs_peft.py`` (its Llama-shaped reference
model, batch and helpers): both sides run alternately (A B, B A, ...) on identical copies
of one randomly initialised Llama, each figure is the median of per-round ratios, and
both sides carry the *same* non-identity values, with the script printing how far their
outputs differ so the timings compare equal work.

- OFT: PEFT's Llama targets ``q_proj``, ``v_proj``; PEFT's defaults (block size 32,
  Cayley-Neumann with 5 terms); both sides rotate the layer input.
- BOFT: the same targets, block size 4 (PEFT's default), one butterfly factor (PEFT
  without its CUDA extension runs only that). PEFT builds the dense ``in × in`` rotation
  and multiplies the input by it; ours rotates the input block by block.

Figures, per method: forward (eval, no_grad) ours / PEFT and ours / frozen base; train
step (LM loss fwd + bwd + AdamW, no weight decay) ours / PEFT; merged forward ours / base;
peak memory while training, ours / PEFT, each side in a fresh subprocess (CPU: peak RSS;
CUDA: ``max_memory_allocated``).

Usage:
    python benchmarks/oft_boft_vs_peft.py            # reference workload
    python benchmarks/oft_boft_vs_peft.py --layers 4 --vocab 8000   # the < 2 min run
    python benchmarks/oft_boft_vs_peft.py --quick    # tiny smoke run
    python benchmarks/oft_boft_vs_peft.py --device cuda --dtype bfloat16

The markdown table is also written to ``benchmarks/out/oft_boft_vs_peft.md``.
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

TARGETS = ["q_proj", "v_proj"]
LABELS = {"oft": "OFT", "boft": "BOFT"}


def attach_ours(method: str, model: nn.Module, args: argparse.Namespace) -> dh.Delta:
    """Non-identity values on our side (a delta left at its start would hide a wrong path)."""
    if method == "oft":
        return dh.attach(model, dh.OFT(targets=TARGETS, init="random"))
    return dh.attach(model, dh.BOFT(targets=TARGETS, block_size=4, init="random"))


def attach_peft(method: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """PEFT's model; its trainable tensors kept in the model dtype (no fp32 upcast), as ours."""
    from peft import BOFTConfig, OFTConfig, get_peft_model
    from peft.tuners.boft import layer

    if method == "oft":
        config = OFTConfig(target_modules=TARGETS)
    else:
        # one butterfly factor: PEFT's path without its CUDA extension, which it would
        # otherwise try (and, without nvcc, fail) to build for every layer
        layer.get_fbd_cuda = lambda: None
        config = BOFTConfig(target_modules=TARGETS, boft_block_size=4)
    return get_peft_model(model, config, autocast_adapter_dtype=False)


@torch.no_grad()
def copy_into_peft(method: str, delta: dh.Delta, peft_model: nn.Module) -> int:
    """Give PEFT our values (the same layouts)."""
    pairs = peft_tensors(delta, peft_model)
    for layer, local, tensor in pairs:
        if local == "oft_R":
            layer.oft_R["default"].weight.copy_(tensor)
        else:
            getattr(layer, local)["default"].copy_(tensor)
    return len(pairs)


BENCH = MethodBench(
    title="deltahooks OFT and BOFT vs PEFT",
    doc=__doc__,
    script=__file__,
    labels=LABELS,
    attach_ours=attach_ours,
    attach_peft=attach_peft,
    share=copy_into_peft,
    workload=lambda args: f"{'/'.join(LABELS[m] for m in args.methods)} on {','.join(TARGETS)}",
)

if __name__ == "__main__":
    main(BENCH)
