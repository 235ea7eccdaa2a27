"""Import PEFT LoHa adapters: ``<path>.hada_w{1,2}_{a,b}``, the layouts of :class:`~deltahooks.LoHa`."""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import DeltaFileError, UnsupportedOperationError, warn
from .peft import _peft_pattern, check_paths, peft_importer

LOHA_NAMES = ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b")


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
    alphas = {p: float(_peft_pattern(p, config.get("alpha_pattern") or {}, alpha)) for p in paths}
    exact = {p: "re:" + re.escape(p) for p in paths}
    return {
        "r": r,
        "alpha": alpha,
        "rank_pattern": {exact[p]: ranks[p] for p in paths if ranks[p] != r},
        "alpha_pattern": {exact[p]: alphas[p] for p in paths if alphas[p] != alpha},
    }


@peft_importer("LOHA")
def loha_from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    """PEFT LoHa: same names and layouts; PEFT's effective-conv (CP) form is refused."""
    from ..methods import LoHa
    from ..targets import Paths

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
