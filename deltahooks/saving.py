"""What ``Delta.save`` writes: each spec's description, the paths it was attached to and
the tensors it keeps, gathered from the installed parts into one delta file.

The counterpart of :mod:`deltahooks.loading`; the file format itself is :mod:`deltahooks.io`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from .distributed import gathered, writes
from .install import InstalledPart
from .io import write_delta
from .spec import DeltaSpec


def paths_and_keys(
    specs: Sequence[DeltaSpec], parts: Sequence[InstalledPart]
) -> tuple[list[list[str]], list[set[str]]]:
    """Per spec: the targets of its parts (attach order), and its saved ``state_dict``
    keys (its shared tensors' too)."""
    paths: list[list[str]] = [[] for _ in specs]
    keys: list[set[str]] = [set() for _ in specs]
    for part in parts:
        paths[part.spec_index].append(part.target)
        entries = [*part.shared.values(), *part.entries]
        keys[part.spec_index].update(entry.key for entry in entries if entry.saved)
    return paths, keys


def save_delta(
    path: str | os.PathLike,
    name: str,
    specs: Sequence[DeltaSpec],
    parts: Sequence[InstalledPart],
    state: dict[str, torch.Tensor],
) -> None:
    """Write the delta ``name`` (its ``state`` = ``state_dict()``) to ``path``.

    Each spec says what of it a file keeps (:meth:`DeltaSpec.saved`). On a model sharded
    with FSDP2 every rank calls this: the shards are gathered (a collective) and rank 0
    writes the file.
    """
    paths, keys = paths_and_keys(specs, parts)
    full, sharded = gathered(state)  # FSDP2: a collective, on every rank
    described: list[dict[str, Any]] = []
    stored: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for spec, where, own in zip(specs, paths, keys):
            kept, tensors = spec.saved({k: v for k, v in full.items() if k in own})
            described.append({**kept.describe(), "paths": where})
            stored.update(tensors)
    if writes(sharded):
        write_delta(path, name, described, stored)
