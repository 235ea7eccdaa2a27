"""PEFT LoRA (and DoRA, ``use_dora``) adapters, both ways.

PEFT LoRA keys look like ``<path>.lora_A.weight`` (embeddings: ``<path>.lora_embedding_A``);
our LoRA uses the same layouts, so tensors convert without transposes. Per-path ranks and
alphas become exact-path ``rank_pattern``/``alpha_pattern`` entries; PEFT's
``target_parameters`` are our parameter targets (:mod:`.lora_parameters`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import DeltaFileError, UnsupportedOperationError, warn
from ...layers import CONV1D_GPT2, EMBEDDING, kind_of
from ...ledger import join
from ...methods import LoRA
from ...targets import Paths, first_match, parameter_paths
from . import lora_parameters as parameters
from .registry import peft_exporter, peft_importer
from .settings import check_paths, exact, most_common, one_setting, peft_pattern

LORA_SUFFIXES = {
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_embedding_A": "lora_A",
    ".lora_embedding_B": "lora_B",
}
DORA_SUFFIXES = {".lora_magnitude_vector": "lora_magnitude_vector"}  # with use_dora

PEFT_ATTENTION_BUG = (
    "PEFT's LoRA on nn.MultiheadAttention (peft 0.21.2 and earlier) adds out_proj's update "
    "twice, in its forward and its merge (huggingface/peft#3774), so PEFT computes another "
    "model from the same adapter file than deltahooks does (deltahooks adds it once, as the "
    "file's tensors define)"
)


@peft_importer("LORA")
def from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT LoRA (and DoRA, ``use_dora``): same tensor layouts and names as ours; rank and
    alpha patterns become exact paths."""
    dora = bool(config.get("use_dora", False))
    suffixes = {**LORA_SUFFIXES, **DORA_SUFFIXES} if dora else LORA_SUFFIXES
    lora: dict[str, dict] = {}
    other = []
    for key, tensor in tensors.items():
        for suffix, local in suffixes.items():
            if key.endswith(suffix):
                lora.setdefault(key[: -len(suffix)], {})[local] = tensor
                break
        else:
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no LoRA layer")
    expected = {"lora_A", "lora_B", *DORA_SUFFIXES.values()} if dora else {"lora_A", "lora_B"}
    incomplete = [path for path, pair in lora.items() if set(pair) != expected]
    if incomplete:
        what = "magnitude vector or pair" if dora else "pair"
        raise DeltaFileError(f"LoRA tensors without their {what} at {incomplete[:5]}")
    if not lora:
        return [], {}
    # nn.MultiheadAttention: PEFT keeps out_proj's pair under "<attention>.base_layer.out_proj";
    # here it belongs to the attention's own part, on its out_proj
    attention: dict[str, dict] = {}
    for key in [
        k for k in lora if k == "base_layer.out_proj" or k.endswith(".base_layer.out_proj")
    ]:
        owner = key[: -len("base_layer.out_proj")].rstrip(".")
        if isinstance(model.get_submodule(owner), nn.MultiheadAttention) and owner in lora:
            attention[owner] = lora.pop(key)
    if attention:
        warn(PEFT_ATTENTION_BUG)
    # target_parameters: PEFT's nested ParamWrappers, keyed by their owner module
    wrapped = parameters.nesting(
        parameters.matched_parameters(model, list(config.get("target_parameters") or []))
    )
    check_paths(model, [p for p in lora if p not in wrapped])
    for prefix, path in wrapped.items():
        if prefix in lora:
            pair = lora.pop(prefix)
            experts = parameters.experts_of(model, path)
            pair["lora_A"], pair["lora_B"] = parameters.from_peft(
                pair["lora_A"], pair["lora_B"], experts
            )
            lora[path] = pair
    paths = list(lora)
    r, alpha = int(config.get("r", 8)), float(config.get("lora_alpha", 8))
    ranks = {p: int(lora[p]["lora_A"].shape[-2 if p in wrapped.values() else 0]) for p in paths}
    alphas = {p: float(peft_pattern(p, config.get("alpha_pattern") or {}, alpha)) for p in paths}
    exact = {p: "re:" + re.escape(p) for p in paths}
    spec = LoRA(
        targets=Paths(paths),
        r=r,
        alpha=alpha,
        dropout=float(config.get("lora_dropout", 0.0)),
        rslora=bool(config.get("use_rslora", False)),
        rank_pattern={exact[p]: ranks[p] for p in paths if ranks[p] != r},
        alpha_pattern={exact[p]: alphas[p] for p in paths if alphas[p] != alpha},
        dora=dora,
    )
    state = {f"{path}.{local}": t for path, pair in lora.items() for local, t in pair.items()}
    for owner, pair in attention.items():
        state.update({join(owner, f"out_proj.{local}"): t for local, t in pair.items()})
    return [spec], state


def _attention_to_peft(part) -> dict[str, torch.Tensor]:
    """LoRA on an ``nn.MultiheadAttention``, as PEFT lays it out: the input projection's
    pair on the module, ``out_proj``'s under ``base_layer.out_proj`` (PEFT wraps it there)."""
    path = part.path
    if f"{path}.lora_A" not in part.tensors:  # separate q/k/v projections
        raise UnsupportedOperationError(
            f"LoRA on {path!r}, an nn.MultiheadAttention with separate query/key/value "
            "projections (kdim or vdim set), has no PEFT form (PEFT takes only a packed "
            "in_proj_weight); keep it as a deltahooks file with delta.save(...)"
        )
    warn(PEFT_ATTENTION_BUG)
    base = f"{path}.base_layer.out_proj" if path else "base_layer.out_proj"
    return {
        f"{path}.lora_A.weight": part.tensors[f"{path}.lora_A"].detach(),
        f"{path}.lora_B.weight": part.tensors[f"{path}.lora_B"].detach(),
        f"{base}.lora_A.weight": part.tensors[f"{path}.out_proj.lora_A"].detach(),
        f"{base}.lora_B.weight": part.tensors[f"{path}.out_proj.lora_B"].detach(),
    }


@peft_exporter("lora")
def to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    """LoRA: same layouts; per-path ranks and alphas become exact-path patterns."""
    dropout = one_setting("LoRA", specs, "dropout")
    rslora = one_setting("LoRA", specs, "rslora")
    dora = one_setting("LoRA", specs, "dora")
    residual = sorted({spec.init for spec in specs} & {"pissa", "olora"})
    if residual:
        raise UnsupportedOperationError(
            f"a LoRA with init={residual[0]!r} acts on a residual of the base weight, which a "
            "PEFT adapter of the original base cannot express; keep it as a deltahooks file "
            "with delta.save(...), or merge it"
        )
    by_index = {part.spec_index: part for part in parts}
    spec_of = dict(zip(sorted(by_index), specs))
    ranks, alphas, tensors, fan_in_fan_out = {}, {}, {}, False
    # parameter targets: PEFT nests one wrapper per parameter of a module (see
    # lora_parameters); ordered as the module holds them, as PEFT wraps them
    order = {path: i for i, (path, _) in enumerate(parameter_paths(model))}
    targeted = sorted((p.target for p in parts if p.target != p.path), key=order.__getitem__)
    on_root = [path for path in targeted if not path.module_path]
    if on_root:
        raise UnsupportedOperationError(
            f"LoRA on {on_root[0]!r}, a parameter of the model's root module, has no PEFT form "
            "(PEFT cannot target parameters of the module it wraps); keep it as a deltahooks "
            "file with delta.save(...), or attach the delta to a model that holds this one"
        )
    prefix_of = {path: prefix for prefix, path in parameters.nesting(targeted).items()}
    for part in parts:
        spec = spec_of[part.spec_index]
        module = model.get_submodule(part.path)
        attention = None
        if isinstance(module, nn.MultiheadAttention):
            attention = _attention_to_peft(part)  # refuses what PEFT cannot hold first
        a, b = (part.tensors[f"{part.target}.lora_{x}"] for x in "AB")
        ranks[part.target] = int(a.shape[-2] if part.target in prefix_of else a.shape[0])
        alpha = first_match(part.target, module, spec.alpha_pattern, model)
        alphas[part.target] = float(spec.alpha if alpha is None else alpha)
        if part.target in prefix_of:
            a, b = parameters.to_peft(a.detach(), b.detach())
            tensors[f"{prefix_of[part.target]}.lora_A.weight"] = a
            tensors[f"{prefix_of[part.target]}.lora_B.weight"] = b
            continue
        if attention is not None:
            tensors.update(attention)
            continue
        kind = kind_of(module)
        fan_in_fan_out |= kind == CONV1D_GPT2
        if kind == EMBEDDING:
            names = ("lora_embedding_A", "lora_embedding_B")
        else:
            names = ("lora_A.weight", "lora_B.weight")
        tensors[f"{part.path}.{names[0]}"] = a.detach()
        tensors[f"{part.path}.{names[1]}"] = b.detach()
        if dora:  # same name and layout as PEFT's
            magnitude = f"{part.path}.lora_magnitude_vector"
            tensors[magnitude] = part.tensors[magnitude].detach()
    r, alpha = most_common(ranks), most_common(alphas)
    fields = {
        "peft_type": "LORA",
        "target_modules": sorted(p for p in ranks if p not in prefix_of),
        "target_parameters": targeted or None,
        "r": r,
        "lora_alpha": alpha,
        "lora_dropout": dropout,
        "use_rslora": rslora,
        "fan_in_fan_out": fan_in_fan_out,
        "bias": "none",
        "init_lora_weights": True,
        "use_dora": dora,
        "rank_pattern": {exact(p): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {exact(p): v for p, v in alphas.items() if v != alpha},
    }
    return fields, tensors
