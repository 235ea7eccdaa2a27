"""Would one GEMM for sibling A-projections speed up a LoRA train step? A probe, not a feature.

Why this script exists: layers that read the same input (q/k/v, gate/up) could compute
their LoRA A-projections as one GEMM, ``x [A_q; A_k; A_v]ᵀ``, reading ``x`` once instead of
three times in forward and in ``grad_A``, and writing one ``grad_x`` instead of three
(Performance II). Before building that into the LoRA site (a cache shared between
modules, learned sibling groups, fallbacks under compile and FSDP2), this measures what
it can buy. Both sides here are bare forward hooks on the same frozen Llama, no
deltahooks and no PEFT, so the only difference is the fusion:

- ``separate``: one ``F.linear(x, A)`` + ``addmm`` per adapted layer (what ``dh.LoRA`` does);
- ``fused``: the first sibling computes ``x [A_1; …; A_n]ᵀ`` once, each takes its slice;
- ``floor``: no LoRA, gradients through every layer: what any LoRA must pay at least.

The probe prints the three train-step times (interleaved) and checks that both LoRA
sides compute the same loss. Results on 2 cores of an AMD EPYC (2026-11-27, quiet):
fused / separate = 0.977, 0.979 and 0.998 in three runs, floor / separate 0.89-0.90. A
version inside ``dh.LoRA`` (siblings learned from the call pattern) was built and dropped:
a stacked GEMM rounds differently from three separate ones, so a model's first call (not
yet fused) and its later calls differed in the last bits (2e-7), and a freshly loaded
delta no longer reproduced a trained one exactly; see benchmarks/README.md.

Usage:
    python -m benchmarks.sibling_fusion_probe            # reference Llama, ~1 minute
    python -m benchmarks.sibling_fusion_probe --quick
"""

from __future__ import annotations

import argparse
import copy
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import _timing as timing
from .harness import (
    MODEL_SHAPES,
    add_shape_flags,
    base_parser,
    build_base,
    fill_shapes,
    make_batch,
    timed_phase,
)
from .measures import floor_step

SHAPES = {**MODEL_SHAPES, "rounds": (9, 2), "warmup": (2, 1)}
# modules of one Llama layer that read the same input, in call order
GROUPS = [
    ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
    ["self_attn.o_proj"],
    ["mlp.gate_proj", "mlp.up_proj"],
    ["mlp.down_proj"],
]


def parse_args() -> argparse.Namespace:
    parser = base_parser(__doc__.split("\n\n")[0])
    add_shape_flags(parser, SHAPES)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    return fill_shapes(parser, parser.parse_args(), SHAPES)


def lora_factors(layer: nn.Module, group: list[str], rank: int, generator) -> list:
    """(module, A, B) per member, small random values."""
    members = []
    for path in group:
        module = layer.get_submodule(path)
        a = nn.Parameter(torch.randn(rank, module.in_features, generator=generator) * 0.02)
        b = nn.Parameter(torch.randn(module.out_features, rank, generator=generator) * 0.02)
        members.append((module, a, b))
    return members


def hook_separately(members: list, scale: float) -> None:
    for module, a, b in members:

        def hook(_module, inputs, y, a=a, b=b):
            h = F.linear(inputs[0], a).reshape(-1, a.shape[0])
            return torch.addmm(y.reshape(-1, y.shape[-1]), h, b.t(), alpha=scale).view(y.shape)

        module.register_forward_hook(hook)


def hook_fused(members: list, scale: float) -> None:
    """The first member computes every member's ``h`` in one GEMM; the others take slices."""
    shared: dict[str, torch.Tensor] = {}
    for index, (module, a, b) in enumerate(members):

        def hook(_module, inputs, y, index=index, a=a, b=b):
            if index == 0:
                stacked = torch.cat([m[1] for m in members])
                shared["h"] = inputs[0].reshape(-1, stacked.shape[1]) @ stacked.t()
            rank = a.shape[0]
            h = shared["h"][:, index * rank : (index + 1) * rank]
            if index == len(members) - 1:
                shared.clear()
            return torch.addmm(y.reshape(-1, y.shape[-1]), h, b.t(), alpha=scale).view(y.shape)

        module.register_forward_hook(hook)


def lora_step(base: nn.Module, ids: torch.Tensor, rank: int, fused: bool) -> Callable[[], float]:
    """A train step (loss, backward, AdamW) of hooked LoRA on every linear of every layer."""
    model = copy.deepcopy(base).requires_grad_(False).train()
    generator = torch.Generator().manual_seed(0)
    params = []
    for layer in model.model.layers:
        for group in GROUPS:
            members = lora_factors(layer, group, rank, generator)
            params += [t for _, a, b in members for t in (a, b)]
            if fused and len(members) > 1:
                hook_fused(members, scale=2.0)
            else:
                hook_separately(members, scale=2.0)
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def run() -> float:
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return run


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    base = build_base(args, device, torch.float32)
    ids = make_batch(args, device)
    separate = lora_step(base, ids, args.rank, fused=False)
    fused = lora_step(base, ids, args.rank, fused=True)
    first = separate(), fused()
    print(f"check: first losses separate {first[0]:.6f}, fused {first[1]:.6f}")
    if abs(first[0] - first[1]) > 1e-4:
        raise SystemExit("the fused and separate LoRA compute different losses")
    cases = {"floor": floor_step(base, ids), "separate": separate, "fused": fused}
    times, _ = timed_phase("LoRA train step: A-projections separate vs fused", cases, args, device)
    for name in ("fused", "floor"):
        ratio = timing.paired_ratio(times[name], times["separate"])
        print(f"{name} / separate (median of per-round ratios): {ratio:.3f}")


if __name__ == "__main__":
    main()
