"""deltahooks LoRA on parameters vs PEFT's ``target_parameters``: same model, same values,
one process, interleaved.

A LoRA target that names a parameter adapts the tensor through a weight site computed
once per call (``W + s·BA``), where PEFT wraps the owning module in a ``ParamWrapper``.
This runs the harness's Llama-shaped model with the parameters of two linear layers per
block as targets (``o_proj.weight``, ``down_proj.weight``): the 2-D case of the same
machinery that reaches the 3-D expert stacks of MoE models (transformers 5 keeps experts
as parameters, not modules). Both sides hold the same random factors, and the script
prints how far their outputs differ so the timings compare equal work.

Figures: forward (eval, no_grad) ours / PEFT and ours / frozen base; train step ours /
PEFT; merged forward ours / base; peak memory while training, fresh subprocess per side.

Usage:
    python benchmarks/lora_parameters_vs_peft.py --quick
    python benchmarks/lora_parameters_vs_peft.py --hidden 256 --layers 4 --vocab 8000
"""

from __future__ import annotations

import argparse

import torch
from _method_vs_peft import MethodBench, dh, main  # benchmarks/ is sys.path[0] as a script
from torch import nn

PARAMETERS = ("o_proj.weight", "down_proj.weight")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)


def attach_ours(method: str, model: nn.Module, args: argparse.Namespace) -> dh.Delta:
    spec = dh.LoRA(targets=list(PARAMETERS), r=args.rank, alpha=args.alpha, init="random")
    return dh.attach(model, spec)


def attach_peft(method: str, model: nn.Module, args: argparse.Namespace) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=args.rank, lora_alpha=args.alpha, target_modules=[], target_parameters=list(PARAMETERS)
    )
    return get_peft_model(model, config, autocast_adapter_dtype=False)


@torch.no_grad()
def share(method: str, delta: dh.Delta, peft_model: nn.Module) -> int:
    """Our ``<module>.weight.lora_A`` is PEFT's ``<module>.lora_A`` (same layouts in 2-D)."""
    modules = dict(peft_model.named_modules())
    copied = 0
    for key, tensor in delta.state_dict().items():
        owner, _, factor = key.rpartition(".")
        module_path = owner.rpartition(".")[0]
        wrapper = modules["base_model.model." + module_path]
        getattr(wrapper, factor)["default"].weight.copy_(tensor)
        copied += 1
    return copied


BENCH = MethodBench(
    title="deltahooks LoRA on parameters vs PEFT target_parameters",
    doc=__doc__,
    script=__file__,
    labels={"lora_parameters": "LoRA on parameters"},
    attach_ours=attach_ours,
    attach_peft=attach_peft,
    share=share,
    workload=lambda args: f"LoRA r={args.rank} alpha={args.alpha:g} on {','.join(PARAMETERS)}",
    add_arguments=add_arguments,
)

if __name__ == "__main__":
    main(BENCH)
