"""PEFT AdaLoRA adapters (``peft_type`` ``"ADALORA"``), both ways.

PEFT stores ``<path>.lora_A`` (r × fan-in), ``<path>.lora_E`` (r × 1) and ``<path>.lora_B``
(fan-out × r), ours' names and layouts. Once its allocator has pruned, PEFT saves only the
kept triplets and their positions in ``config["rank_pattern"]`` (``{"<path>.lora_E":
[kept, ...]}``); ours keep ``init_r`` triplets, a pruned one being a zero in ``lora_E``,
so the kept ones go back to their positions and the others stay zero: the same update.
"""

from __future__ import annotations

import torch
from torch import nn

from ...errors import DeltaFileError, UnsupportedOperationError
from ...layers import CONV1D_GPT2, kind_of
from ...methods import AdaLoRA
from ...targets import Paths
from .registry import peft_exporter, peft_importer
from .settings import check_paths, one_setting

NAMES = ("lora_A", "lora_B", "lora_E")


@peft_importer("ADALORA")
def from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    triplets: dict[str, dict] = {}
    other = []
    for key, tensor in tensors.items():
        path, _, name = key.rpartition(".")
        if name in NAMES and path:
            triplets.setdefault(path, {})[name] = tensor
        else:
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no AdaLoRA layer")
    incomplete = [path for path, found in triplets.items() if len(found) != 3]
    if incomplete:
        raise DeltaFileError(f"AdaLoRA tensors without their triplet at {incomplete[:5]}")
    if not triplets:
        return [], {}
    if config.get("use_dora") or config.get("use_rslora"):
        raise UnsupportedOperationError(
            "AdaLoRA adapters with use_dora or use_rslora are not supported (PEFT ignores them "
            "for AdaLoRA too); save the adapter without them"
        )
    paths = list(triplets)
    check_paths(model, paths)
    init_r = int(config.get("init_r", 12))
    try:
        spec = AdaLoRA(
            targets=Paths(paths),
            init_r=init_r,
            target_r=int(config.get("target_r", 8)),
            total_step=int(config["total_step"]),
            tinit=int(config.get("tinit", 0)),
            tfinal=int(config.get("tfinal", 0)),
            deltaT=int(config.get("deltaT", 1)),
            beta1=float(config.get("beta1", 0.85)),
            beta2=float(config.get("beta2", 0.85)),
            orth_reg_weight=float(config.get("orth_reg_weight", 0.5)),
            alpha=float(config.get("lora_alpha", 8)),
            dropout=float(config.get("lora_dropout", 0.0)),
        )
    except (KeyError, TypeError, ValueError) as err:
        raise DeltaFileError(f"adapter_config.json has invalid AdaLoRA settings ({err})") from None
    patterns = config.get("rank_pattern") or {}
    state = {}
    for path, found in triplets.items():
        kept = patterns.get(f"{path}.lora_E")
        if kept is not None:
            found = _expand(path, found, kept, init_r)
        for name in NAMES:
            state[f"{path}.{name}"] = found[name]
    return [spec], state


def _expand(path: str, found: dict, kept: list, init_r: int) -> dict[str, torch.Tensor]:
    """PEFT's pruned triplets put back at their positions among ``init_r``; the rest zero."""
    if not isinstance(kept, list) or len(kept) != init_r or not all(k in (0, 1) for k in kept):
        raise DeltaFileError(
            f"rank_pattern of {path!r} must be {init_r} booleans (init_r), got {kept!r:.80}"
        )
    index = torch.tensor([i for i, k in enumerate(kept) if k], dtype=torch.long)
    a, b, e = found["lora_A"], found["lora_B"], found["lora_E"]
    if a.shape[0] != len(index) or b.shape[-1] != len(index) or e.shape != (len(index), 1):
        raise DeltaFileError(
            f"{path!r} holds {a.shape[0]} AdaLoRA triplets but its rank_pattern keeps {len(index)}"
        )
    full_a = a.new_zeros(init_r, a.shape[1])
    full_b = b.new_zeros(b.shape[0], init_r)
    full_e = e.new_zeros(init_r, 1)
    full_a[index], full_b[:, index], full_e[index] = a, b, e
    return {"lora_A": full_a, "lora_B": full_b, "lora_E": full_e}


SETTINGS = {  # PEFT's name: ours
    "init_r": "init_r",
    "target_r": "target_r",
    "tinit": "tinit",
    "tfinal": "tfinal",
    "deltaT": "deltaT",
    "beta1": "beta1",
    "beta2": "beta2",
    "orth_reg_weight": "orth_reg_weight",
    "total_step": "total_step",
    "lora_dropout": "dropout",
}


@peft_exporter("adalora")
def to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    """AdaLoRA: ``lora_A``/``lora_E``/``lora_B`` as ours. Once triplets are pruned (a zero
    in ``lora_E``), as PEFT saves after its allocator ran: only the kept triplets, and
    ``rank_pattern`` ``{"<path>.lora_E": [kept, ...]}`` for every layer. A delta whose
    ``lora_E`` is zero everywhere (untrained, PEFT's start) is saved whole."""
    fields = {peft: one_setting("AdaLoRA", specs, ours) for peft, ours in SETTINGS.items()}
    alpha = one_setting("AdaLoRA", specs, "alpha")
    init_r = fields["init_r"]
    triplets, conv1d = {}, False
    for part in parts:
        conv1d |= kind_of(model.get_submodule(part.path)) == CONV1D_GPT2
        triplets[part.path] = {n: part.tensors[f"{part.path}.{n}"].detach() for n in NAMES}
    kept = {path: (found["lora_E"] != 0).view(-1) for path, found in triplets.items()}
    pruned = any(bool(k.any()) for k in kept.values()) and not all(
        bool(k.all()) for k in kept.values()
    )
    tensors, rank_pattern = {}, {}
    for path, found in triplets.items():
        if pruned:
            index = kept[path].nonzero().view(-1)
            rank_pattern[f"{path}.lora_E"] = kept[path].tolist()
            found = {
                "lora_A": found["lora_A"][index],
                "lora_E": found["lora_E"][index],
                "lora_B": found["lora_B"][:, index],
            }
        tensors.update({f"{path}.{name}": t for name, t in found.items()})
    fields.update(
        {
            "peft_type": "ADALORA",
            "target_modules": sorted(triplets),
            # ours: alpha 0 means init_r; PEFT's would become the pruned rank per layer
            "lora_alpha": float(alpha) if alpha > 0 else float(init_r),
            "rank_pattern": rank_pattern or None,
            "fan_in_fan_out": conv1d,
            "bias": "none",
            "init_lora_weights": True,
        }
    )
    return fields, tensors
