"""Optimizer parameter groups for a delta's trainable tensors (LoRA+).

Which learning rate each tensor gets is a training choice, not part of a method: the
groups are built from a live :class:`~deltahooks.Delta` and handed to any ``torch.optim``
optimizer.
"""

from __future__ import annotations

import torch
from torch import nn

from . import validate
from .errors import SpecError
from .layers import EMBEDDING, is_norm, kind_of


def loraplus_param_groups(
    delta,
    lr: float,
    ratio: float = 16.0,
    *,
    lr_embedding: float = 1e-6,
    weight_decay: float = 0.0,
) -> list[dict]:
    """Optimizer parameter groups for LoRA+ (Hayou et al., 2024, "LoRA+: Efficient Low Rank
    Adaptation of Large Models"): ``B`` learns ``ratio`` times faster than ``A``.

    The grouping is PEFT's ``create_loraplus_optimizer``: ``A`` and ``B`` of a LoRA on an
    ``nn.Embedding`` get ``lr_embedding``; ``lora_B`` and every 1-D tensor (DoRA's
    magnitudes, an embedding's too; biases) get ``lr · ratio``; the rest (``lora_A``, 2-D tensors of other
    methods, e.g. a ``Full`` head's weight) get ``lr``. Tensors whose name holds
    ``"bias"`` or that belong to a norm layer get no weight decay; the others get
    ``weight_decay``. Empty groups are left out. Pass the result to any
    ``torch.optim`` optimizer.

    Args:
        delta: the :class:`deltahooks.Delta` whose trainable tensors are grouped.
        lr: the learning rate of ``A`` (PEFT: ``lr``), a finite number ``> 0``.
        ratio: ``lr_B / lr_A``, a finite number ``> 0`` (the paper and PEFT suggest
            ``>= 1``; default ``16``, the paper's). PEFT: ``loraplus_lr_ratio``.
        lr_embedding: the learning rate of LoRA tensors on embeddings. Default ``1e-6``.
            PEFT: ``loraplus_lr_embedding``.
        weight_decay: weight decay of the decayed groups. Default ``0.0``. PEFT:
            ``loraplus_weight_decay``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))
        >>> groups = dh.loraplus_param_groups(delta, lr=1e-4, ratio=16)
        >>> [(len(g["params"]), g["lr"]) for g in groups]
        [(1, 0.0001), (1, 0.0016)]
        >>> optimizer = torch.optim.AdamW(groups)
    """
    validate.finite("loraplus_param_groups", "lr", lr, minimum=0)
    validate.finite("loraplus_param_groups", "ratio", ratio, minimum=0)
    validate.finite("loraplus_param_groups", "lr_embedding", lr_embedding, minimum=0)
    validate.finite("loraplus_param_groups", "weight_decay", weight_decay, minimum=0)
    if lr <= 0 or ratio <= 0:
        raise SpecError(
            f"loraplus_param_groups needs lr > 0 and ratio > 0, got lr={lr!r}, ratio={ratio!r}"
        )
    groups: dict[str, list] = {"A": [], "embedding": [], "B": [], "B_no_decay": []}
    seen: set[int] = set()
    root = delta.model
    for view in delta.parts:
        embedding = view.method == "lora" and kind_of(root.get_submodule(view.path)) == EMBEDDING
        for key, tensor in view.tensors.items():
            if not (isinstance(tensor, nn.Parameter) and tensor.requires_grad):
                continue
            seen.add(id(tensor))
            # a parameter target's tensors sit on the module that owns the parameter
            on_parameter = view.target != view.path and key.startswith(f"{view.target}.")
            owner = root.get_submodule(view.path if on_parameter else key.rpartition(".")[0])
            groups[_loraplus_group(key, tensor, owner, embedding)].append(tensor)
    for key, tensor in delta.shared.items():  # tensors shared by all targets of a spec
        if isinstance(tensor, nn.Parameter) and tensor.requires_grad and id(tensor) not in seen:
            groups[_loraplus_group(key, tensor, root, False)].append(tensor)
    settings = {
        "A": (lr, weight_decay),
        "embedding": (lr_embedding, weight_decay),
        "B": (lr * ratio, weight_decay),
        "B_no_decay": (lr * ratio, 0.0),
    }
    return [
        {"params": params, "lr": settings[name][0], "weight_decay": settings[name][1]}
        for name, params in groups.items()
        if params
    ]


def _loraplus_group(key: str, tensor: torch.Tensor, owner: nn.Module, embedding: bool) -> str:
    local = key.rpartition(".")[2]
    # PEFT groups an embedding's DoRA magnitude with the 1-D tensors, not the embedding
    if embedding and local in ("lora_A", "lora_B"):
        return "embedding"
    if local == "lora_B" or tensor.dim() == 1:
        no_decay = "bias" in key or is_norm(owner) or isinstance(owner, nn.LayerNorm)
        return "B_no_decay" if no_decay else "B"
    return "A"
