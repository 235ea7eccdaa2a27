"""PEFT's LayerNorm tuning adapters, both ways.

PEFT trains copies of the norm's ``weight``/``bias`` (``<path>.ln_tuning_layers.<attr>``);
ours trains their differences from the base, so a file holds ``base + Δ`` and an import
keeps ``copy - base`` (in float32 or wider, then the norm's dtype).
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import DeltaFileError
from ...merging import stored
from ...methods import LNTuning
from ...targets import Paths
from .registry import peft_exporter, peft_importer
from .settings import check_paths

LN_KEY = ".ln_tuning_layers."
OURS = {"weight": "ln_weight", "bias": "ln_bias"}


@peft_importer("LN_TUNING")
def from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    copies: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        path, found, attr = key.rpartition(LN_KEY)
        if not found or attr not in OURS:
            raise DeltaFileError(f"tensor {key!r} belongs to no LN tuning layer")
        copies.setdefault(path, {})[attr] = tensor
    if not copies:
        return [], {}
    check_paths(model, copies)
    state = {}
    for path, attrs in copies.items():
        module = model.get_submodule(path)
        for attr, copy in attrs.items():
            base = stored(module, attr)
            exact = torch.promote_types(base.dtype, torch.float32)
            difference = copy.to(exact) - base.detach().to(copy.device, exact)
            state[f"{path}.{OURS[attr]}"] = difference.to(base.dtype)
    return [LNTuning(targets=Paths(list(copies)))], state


@peft_exporter("ln_tuning")
def to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    tensors = {}
    with torch.no_grad():
        for part in parts:
            module = model.get_submodule(part.path)
            for attr, local in OURS.items():
                key = f"{part.path}.{local}"
                if key in part.tensors:
                    base = stored(module, attr)
                    exact = torch.promote_types(base.dtype, torch.float32)
                    total = base.to(exact) + part.tensors[key].to(exact)
                    tensors[f"{part.path}{LN_KEY}{attr}"] = total.to(base.dtype)
    fields = {"peft_type": "LN_TUNING", "target_modules": sorted(p.path for p in parts)}
    return fields, tensors
