"""PEFT's LoRA ``target_parameters`` (its ``lora.ParamWrapper``) ↔ our parameter targets.

PEFT wraps the module that owns a targeted parameter; when several parameters of one
module are targeted the wrappers nest, in the module's own parameter order: the first
one is innermost. Their tensors are saved as ``<module>.<"base_layer." × depth>lora_A.weight``
with depth 0 for the last (outermost) wrapper. Per wrapper ``lora_A.weight`` is
``(E·r) × in`` (expert ``e`` owns rows ``e·r … e·r + r - 1``) and ``lora_B.weight`` is
``out × (r·E)`` (rank ``k`` of expert ``e`` is column ``k·E + e``); ours are ``E × r × in``
and ``E × out × r``. 2-D weights have PEFT's Linear layouts (``r × in``, ``out × r``) on
both sides.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import DeltaFileError
from ...merging import stored
from ...targets import ParameterPath, parameter_paths

BASE = "base_layer."


def matched_parameters(model: nn.Module, targets: list[str]) -> list[ParameterPath]:
    """The parameters PEFT's ``target_parameters`` select: the full path or a ``.``-suffix."""
    wanted = [t for t in targets if isinstance(t, str) and t]
    return [
        path
        for path, _ in parameter_paths(model)
        if any(path == t or path.endswith("." + t) for t in wanted)
    ]


def nesting(paths: list[ParameterPath]) -> dict[str, ParameterPath]:
    """``{PEFT key prefix: parameter path}``: the last targeted parameter of a module is
    the outermost wrapper (``<module>``), each earlier one a ``base_layer.`` deeper."""
    by_owner: dict[str, list[ParameterPath]] = {}
    for path in paths:
        by_owner.setdefault(path.module_path, []).append(path)
    prefixes = {}
    for owner, own in by_owner.items():
        for depth, path in enumerate(reversed(own)):
            inner = ".".join(["base_layer"] * depth)
            prefixes[".".join(p for p in (owner, inner) if p)] = path
    return prefixes


def experts_of(model: nn.Module, path: ParameterPath) -> int:
    """0 for a 2-D weight, else the number of stacked experts (the leading dimension)."""
    weight = stored(model.get_submodule(path.module_path), path.name)
    return weight.shape[0] if weight.dim() == 3 else 0


def from_peft(a: torch.Tensor, b: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PEFT's ``lora_A.weight``/``lora_B.weight`` as our ``A``, ``B``."""
    if not experts:
        return a, b
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % experts or b.shape[1] != a.shape[0]:
        raise DeltaFileError(
            f"LoRA tensors of shapes {list(a.shape)} / {list(b.shape)} do not split into "
            f"{experts} experts (PEFT's (E·r) × in and out × (r·E))"
        )
    rank = a.shape[0] // experts
    return a.reshape(experts, rank, a.shape[1]), b.reshape(b.shape[0], rank, experts).permute(
        2, 0, 1
    )


def to_peft(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our ``A``, ``B`` in PEFT's ``lora_A.weight``/``lora_B.weight`` layouts."""
    if a.dim() == 2:
        return a, b
    experts, rank, fan_in = a.shape
    return a.reshape(experts * rank, fan_in), b.permute(1, 2, 0).reshape(b.shape[1], -1)
