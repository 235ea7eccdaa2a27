"""PEFT's (IA)³ adapters, both ways.

PEFT keeps each vector as ``(out, 1)`` (``(1, in)`` for feedforward layers,
``(1, C, 1, …)`` for convolutions) under ``<path>.ia3_l``; ours is the same values flat.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ...errors import DeltaFileError
from ...layers import CONV, CONV1D_GPT2, kind_of
from ...methods import IA3
from ...targets import Paths, first_match
from .registry import peft_exporter, peft_importer
from .settings import check_paths


def peft_matches(path: str, patterns) -> bool:
    """PEFT's module-name rule: a string is a full-match regex, a list matches suffixes."""
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, path) is not None
    return any(path == p or path.endswith(f".{p}") for p in patterns)


def split_keys(tensors: dict, suffix: str, what: str) -> dict[str, torch.Tensor]:
    found, other = {}, []
    for key, tensor in tensors.items():
        if key.endswith(suffix):
            found[key[: -len(suffix)]] = tensor
        else:
            other.append(key)
    if other:
        raise DeltaFileError(f"tensors {sorted(other)[:5]} belong to no {what} layer")
    return found


def exact_entries(paths) -> list[str]:
    return [f"re:{re.escape(path)}" for path in paths]


@peft_importer("IA3")
def from_peft(model: nn.Module, config: dict, tensors: dict) -> tuple[list, dict]:
    vectors = split_keys(tensors, ".ia3_l", "IA3")
    if not vectors:
        return [], {}
    check_paths(model, vectors)
    feedforward = [p for p in vectors if peft_matches(p, config.get("feedforward_modules"))]
    spec = IA3(targets=Paths(list(vectors)), feedforward=exact_entries(feedforward))
    return [spec], {f"{path}.ia3_l": v.flatten() for path, v in vectors.items()}


@peft_exporter("ia3")
def to_peft(model: nn.Module, specs: list, parts: list) -> tuple[dict, dict]:
    spec_of = dict(zip(sorted({part.spec_index for part in parts}), specs))
    tensors, feedforward, conv1d = {}, [], False
    for part in parts:
        module = model.get_submodule(part.path)
        entries = dict.fromkeys(_listed(spec_of[part.spec_index].feedforward), True)
        is_feedforward = bool(first_match(part.path, module, entries, model))
        vector = part.tensors[f"{part.path}.ia3_l"].detach()
        if kind_of(module) == CONV:
            shape = (1, -1, *([1] * (module.weight.dim() - 2)))
        else:
            shape = (1, -1) if is_feedforward else (-1, 1)
        conv1d |= kind_of(module) == CONV1D_GPT2
        tensors[f"{part.path}.ia3_l"] = vector.reshape(shape)
        if is_feedforward:
            feedforward.append(part.path)
    paths = sorted(part.path for part in parts)
    fields = {
        "peft_type": "IA3",
        "target_modules": paths,
        "feedforward_modules": sorted(feedforward),
        "fan_in_fan_out": conv1d,
        "init_ia3_weights": True,
    }
    return fields, tensors


def _listed(feedforward) -> list:
    return [feedforward] if isinstance(feedforward, str) else list(feedforward or [])
