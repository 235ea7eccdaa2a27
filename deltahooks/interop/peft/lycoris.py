"""PEFT's LyCORIS adapters, LoHa and LoKr, both ways.

LoHa stores ``<path>.hada_w{1,2}_{a,b}``, LoKr ``<path>.lokr_w{1,2}`` (or their ``_a``/``_b``
low-rank pairs): the names and layouts of :class:`~deltahooks.LoHa` and
:class:`~deltahooks.LoKr`, so only the config is converted (ranks and alphas per exact
path). PEFT's effective-conv (CP) forms are refused.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import DeltaFileError, UnsupportedOperationError, warn
from ...layers import CONV1D_GPT2, kind_of
from ...methods import LoHa, LoKr
from ...targets import Paths, first_match
from .registry import peft_exporter, peft_importer
from .settings import check_paths, exact, most_common, one_setting, peft_pattern

LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")
LOKR_NAMES = ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")


def group_by_layer(
    model: nn.Module, tensors: dict, names: tuple[str, ...], method: str
) -> dict[str, dict]:
    """``{layer path: {tensor name: tensor}}``; a key that is no ``<path>.<name>`` is refused.

    PEFT also saves the base weights of an adapted ``lm_head``/embedding
    (``<path>.base_layer.weight``, ``save_embedding_layers``); they are skipped when they
    equal the model's own, and refused when they differ (a resized vocabulary).
    """
    layers: dict[str, dict] = {}
    other = []
    for key, tensor in tensors.items():
        path, _, name = key.rpartition(".")
        if name in names and path:
            layers.setdefault(path, {})[name] = tensor
        elif ".base_layer." in key:
            _check_base_copy(model, key, tensor)
        else:
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no {method} layer")
    return layers


def _check_base_copy(model: nn.Module, key: str, tensor: torch.Tensor) -> None:
    own = dict(model.state_dict(keep_vars=True)).get(key.replace(".base_layer.", "."))
    if own is None or own.shape != tensor.shape or not torch.equal(own.detach().cpu(), tensor):
        raise UnsupportedOperationError(
            f"the adapter carries its own base weights {key!r}, which differ from the model's "
            "(e.g. a resized vocabulary); resize the model's embeddings as in training first"
        )


def warn_training_dropouts(config: dict, method: str) -> None:
    """PEFT's rank/module dropouts act in training only: outputs are exact without them."""
    used = {k: config[k] for k in ("rank_dropout", "module_dropout") if config.get(k)}
    if used:
        warn(
            f"PEFT {method} {used} is not supported and was dropped: the imported delta gives "
            "PEFT's outputs, but further training runs without these dropouts"
        )


def patterns(config: dict, paths: list[str], ranks: dict[str, int]) -> dict:
    """``r``/``alpha`` of the spec, and exact-path overrides where a layer differs."""
    r, alpha = int(config.get("r", 8)), float(config.get("alpha", 8))
    alphas = {p: float(peft_pattern(p, config.get("alpha_pattern") or {}, alpha)) for p in paths}
    exact = {p: "re:" + re.escape(p) for p in paths}
    return {
        "r": r,
        "alpha": alpha,
        "rank_pattern": {exact[p]: ranks[p] for p in paths if ranks[p] != r},
        "alpha_pattern": {exact[p]: alphas[p] for p in paths if alphas[p] != alpha},
    }


def _complete(found: dict) -> bool:
    """One full or low-rank form of each of the two factors."""
    return all(
        (f"lokr_w{i}" in found) != ({f"lokr_w{i}_a", f"lokr_w{i}_b"} <= set(found))
        and ((f"lokr_w{i}_a" in found) == (f"lokr_w{i}_b" in found))
        for i in (1, 2)
    )


@peft_importer("LOHA")
def loha_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT LoHa: same names and layouts; PEFT's effective-conv (CP) form is refused."""
    if any(key.endswith((".hada_t1", ".hada_t2")) for key in tensors):
        raise UnsupportedOperationError(
            "PEFT LoHa adapters with use_effective_conv2d=True (hada_t1/hada_t2) are not "
            "supported; train with use_effective_conv2d=False (PEFT's default)"
        )
    layers = group_by_layer(model, tensors, LOHA_NAMES, "LoHa")
    incomplete = [path for path, found in layers.items() if set(found) != set(LOHA_NAMES)]
    if incomplete:
        raise DeltaFileError(f"LoHa layers without all four factors at {incomplete[:5]}")
    if not layers:
        return [], {}
    warn_training_dropouts(config, "LoHa")
    paths = list(layers)
    check_paths(model, paths)
    ranks = {p: int(layers[p]["hada_w1_b"].shape[0]) for p in paths}
    spec = LoHa(targets=Paths(paths), **patterns(config, paths, ranks))
    state = {f"{path}.{name}": t for path, found in layers.items() for name, t in found.items()}
    return [spec], state


@peft_importer("LOKR")
def lokr_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT LoKr: same names and layouts; which factors are low-rank follows from the same
    rule on both sides, so the spec rebuilds the file's structure (the load checks it)."""
    if any(key.endswith(".lokr_t2") for key in tensors):
        raise UnsupportedOperationError(
            "PEFT LoKr adapters with use_effective_conv2d=True (lokr_t2) are not supported; "
            "train with use_effective_conv2d=False (PEFT's default)"
        )
    layers = group_by_layer(model, tensors, LOKR_NAMES, "LoKr")
    incomplete = [path for path, found in layers.items() if not _complete(found)]
    if incomplete:
        raise DeltaFileError(f"LoKr layers without both of their factors at {incomplete[:5]}")
    if not layers:
        return [], {}
    warn_training_dropouts(config, "LoKr")
    paths = list(layers)
    check_paths(model, paths)
    r = int(config.get("r", 8))
    ranks = {p: int(peft_pattern(p, config.get("rank_pattern") or {}, r)) for p in paths}
    spec = LoKr(
        targets=Paths(paths),
        factor=int(config.get("decompose_factor", -1)),
        decompose_both=bool(config.get("decompose_both", False)),
        **patterns(config, paths, ranks),
    )
    state = {f"{path}.{name}": t for path, found in layers.items() for name, t in found.items()}
    return [spec], state


# ------------------------------------------------------------------------------ export
def _common(method: str, model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    spec_of = dict(zip(sorted({part.spec_index for part in parts}), specs))
    ranks, alphas, tensors = {}, {}, {}
    for part in parts:
        spec, module = spec_of[part.spec_index], model.get_submodule(part.path)
        if kind_of(module) == CONV1D_GPT2:
            raise UnsupportedOperationError(
                f"PEFT's {method} does not take GPT-2 Conv1D layers such as {part.path!r}; "
                "keep this delta as a deltahooks file with delta.save(...)"
            )
        rank = first_match(part.path, module, spec.rank_pattern, model)
        alpha = first_match(part.path, module, spec.alpha_pattern, model)
        ranks[part.path] = int(spec.r if rank is None else rank)
        alphas[part.path] = float(spec.alpha if alpha is None else alpha)
        for key, tensor in part.tensors.items():
            tensors[key] = tensor.detach()
    r, alpha = most_common(ranks), most_common(alphas)
    fields = {
        "target_modules": sorted(ranks),
        "r": r,
        "alpha": alpha,
        "rank_pattern": {exact(p): k for p, k in ranks.items() if k != r},
        "alpha_pattern": {exact(p): v for p, v in alphas.items() if v != alpha},
        "rank_dropout": 0.0,
        "module_dropout": 0.0,
        "use_effective_conv2d": False,
        "init_weights": True,
    }
    return fields, tensors


@peft_exporter("loha")
def loha_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    fields, tensors = _common("LoHa", model, specs, parts)
    return {"peft_type": "LOHA", **fields}, tensors


@peft_exporter("lokr")
def lokr_to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    factor = one_setting("LoKr", specs, "factor")
    decompose_both = one_setting("LoKr", specs, "decompose_both")
    fields, tensors = _common("LoKr", model, specs, parts)
    extra = {
        "decompose_factor": factor,
        "decompose_both": decompose_both,
        "rank_dropout_scale": False,
    }
    return {"peft_type": "LOKR", **fields, **extra}, tensors
