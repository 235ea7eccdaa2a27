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
import tempfile
import warnings
from collections.abc import Callable

import torch
from _method_vs_peft import (  # benchmarks/ is sys.path[0] when run as a script
    MethodBench,
    dh,
    main,
    train_fn,
)
from torch import nn

TARGETS = ["q_proj", "v_proj"]
SMALL = {"hidden": 256, "layers": 4, "intermediate": 688, "heads": 4, "vocab": 8000, "seq": 64}
TOTAL_STEP = 10_000  # AdaLoRA's schedule length: the timed steps stay in its budget phase


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


def attach_peft(
    method: str, model: nn.Module, args: argparse.Namespace, identity: bool = False
) -> nn.Module:
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


def attach_ours(method: str, model: nn.Module, args: argparse.Namespace) -> dh.Delta:
    """Our delta alone (the memory workers): the same shapes; values do not change memory."""
    if method == "vera":
        spec = dh.VeRA(targets=TARGETS, r=256, init="random")
    else:
        spec = dh.AdaLoRA(
            targets=TARGETS, init_r=12, target_r=8, total_step=TOTAL_STEP, alpha=32, init="random"
        )
    return dh.attach(model, spec)


def pair(
    method: str, ours_model: nn.Module, peft_source: nn.Module, args: argparse.Namespace
) -> tuple[dh.Delta, nn.Module, None]:
    """PEFT's model, and ours with PEFT's exact values, through its files and ``dh.load_peft``."""
    peft_model = attach_peft(method, peft_source, args)
    with tempfile.TemporaryDirectory() as directory:
        peft_model.save_pretrained(directory)
        return dh.load_peft(ours_model, directory), peft_model, None


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


def train_step(
    method: str,
    side: str,
    model: nn.Module,
    delta: dh.Delta | None,
    ids: torch.Tensor,
    losses: list[torch.Tensor],
) -> Callable[[], None]:
    """One AdamW step (no weight decay), the allocator's update between step and zero_grad."""
    step = Step(method, side, model, delta)
    return train_fn(model, ids, losses, 0.0, loss_fn=step.loss, after_step=step.after_backward)


BENCH = MethodBench(
    title="deltahooks VeRA and AdaLoRA vs PEFT",
    doc=__doc__,
    script=__file__,
    labels={"vera": "VeRA", "adalora": "AdaLoRA"},
    attach_ours=attach_ours,
    attach_peft=attach_peft,
    pair=pair,
    workload=lambda args: (
        f"on {','.join(TARGETS)}: VeRA r=256; AdaLoRA init_r=12 target_r=8 (budget phase)"
    ),
    train_step=train_step,
    train_title="train step (fwd + bwd + AdamW)",
    small=SMALL,
    profile=False,
    peft_reference=False,
    check_unmerge=False,
)

if __name__ == "__main__":
    warnings.filterwarnings("ignore")  # PEFT's notes on fan_in_fan_out, r, unmerge
    main(BENCH)
