"""How LoRA's factors start.

``default``/``gaussian`` (PEFT's): one factor random, the other zero, so ``BA = 0`` and
the model is unchanged at attach; ``random``: both non-zero, for tests. PiSSA (Meng et
al., 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation") and OLoRA
(Büyükakyüz, 2024, "OLoRA: Orthonormal Low-Rank Adaptation") start from the weight:

    PiSSA: ``W = U S Vᵀ``, ``B = U_r √(S_r/s)``, ``A = √(S_r/s) V_rᵀ``
    OLoRA: ``W = Q R``, ``B = Q_r``, ``A = R_r``

and the layer computes with the residual ``W - sBA`` while attached, a buffer it reads
through a redirect: the base weight itself is never written, so detach is exact.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import DeltaStateError, SpecError, UnsupportedModuleError
from ..layers import EMBEDDING
from ..ledger import join
from ..registry import registry_of
from ..sites import RedirectSite
from ._lora_layouts import channel_rows, to_weight_layout_of

INITS = ("default", "gaussian", "random", "pissa", "olora")
RESIDUAL_INITS = ("pissa", "olora")  # the layer computes with W - sBA₀ while attached


@torch.no_grad()
def initialise(a: torch.Tensor, b: torch.Tensor, init: str, kind: str, rank: int) -> None:
    # The zero factor makes the delta start at exactly zero; for embeddings it is A
    # (PEFT's convention), since A is what the token ids index.
    first, second = (b, a) if kind == EMBEDDING else (a, b)
    if init == "default":
        if kind == EMBEDDING:
            nn.init.normal_(first)
        else:
            nn.init.kaiming_uniform_(first, a=math.sqrt(5))
        nn.init.zeros_(second)
    elif init == "gaussian":
        nn.init.normal_(first, std=1.0 / rank)
        nn.init.zeros_(second)
    else:  # "random": both factors non-zero, so tests see a real delta
        nn.init.normal_(first, std=1.0 / math.sqrt(first.shape[-1]))
        nn.init.normal_(second, std=1.0 / math.sqrt(rank))


@torch.no_grad()
def decompose(a, b, residual, weight, init: str, kind: str, scale: float) -> None:
    """PiSSA / OLoRA: ``A``, ``B`` from ``W`` (as out × in, float32); ``residual = W - sBA``.

    The same steps as PEFT's (``torch.linalg.svd`` / ``qr`` in float32, the residual cast
    back to the weight's dtype), so the same weight gives the same factors.
    """
    rank = a.shape[0]
    matrix = channel_rows(kind, weight.detach()).to(torch.float32)
    if init == "pissa":
        u, singular, vh = torch.linalg.svd(matrix, full_matrices=False)
        root = torch.sqrt(singular[:rank] / scale)
        new_a, new_b = root[:, None] * vh[:rank], u[:, :rank] * root
    else:  # olora
        q, r = torch.linalg.qr(matrix)
        new_a, new_b = r[:rank], q[:, :rank]
    a.copy_(new_a)
    b.copy_(new_b)
    rest = matrix - scale * new_b @ new_a
    residual.copy_(to_weight_layout_of(kind, rest))


def check_residual_start(
    init: str, path: str, root: nn.Module, direct: bool, rank: int, widths: tuple[int, int]
) -> None:
    """Refuse PiSSA/OLoRA where the residual cannot stand in for the weight."""
    if direct:
        raise UnsupportedModuleError(
            f"LoRA init={init!r} cannot start {path!r}: the model reads its weight "
            "directly instead of calling it, so LoRA acts through the weight there, and "
            "the residual of PiSSA/OLoRA replaces that weight; exclude it (exclude=...) "
            "or use another init"
        )
    fan_in, fan_out = widths
    full_rank = min(fan_in, fan_out)
    if rank > full_rank:
        raise SpecError(
            f"LoRA init={init!r} on {path!r} needs r <= {full_rank} (the full rank of "
            f"its {fan_out} x {fan_in} weight), got {rank}; lower r or use rank_pattern"
        )
    refuse_merged_weight(path, root)


def residual_start(
    path: str,
    tensors: dict,
    weight: torch.Tensor,
    init: str,
    kind: str,
    scale: float,
    like: dict,
    build: bool,
) -> dict:
    """Start ``A``, ``B`` from ``weight`` and add the residual ``W - sBA₀`` to ``tensors``,
    registered as "weight" with a redirect that makes the layer read it, on ``like``'s
    device; ``build=False`` (a plan) makes shapes only. Returns the part's extra sites
    and unsaved names."""
    residual = torch.empty_like(weight, device=like["device"])
    if build:
        decompose(tensors["lora_A"], tensors["lora_B"], residual, weight, init, kind, scale)
    tensors[(path, "weight")] = (residual, False)
    return {"sites": [RedirectSite(((path, "weight"),))], "unsaved": ["weight"]}


def refuse_merged_weight(path: str, root: nn.Module) -> None:
    """The residual must come from the original weight; one with a delta merged into it
    would keep that delta's update after its unmerge (the layer reads the residual)."""
    registry = registry_of(root)
    stack = registry.merge_stacks.get(join(path, "weight")) if registry is not None else None
    if stack:
        raise DeltaStateError(
            f"LoRA init='pissa'/'olora' on {path!r}: delta {stack[-1]!r} is merged into its "
            "weight, and the residual must come from the original weight; unmerge it first"
        )
