"""Merging a delta's parts into the weights and back: the order, the checks that come
before anything changes, and the rollback when a merge fails halfway.

Each step is a function over the installed parts and the ledger; the :class:`~deltahooks.
delta.Delta` only keeps its switch in line with what they did. Parts that replace a tensor
merge before those that add to it (``merge_order``), and unmerge in the reverse order.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from .errors import DeltaStateError
from .install import InstalledPart
from .ledger import Ledger
from .merging import merged_on_top

MethodOf = Callable[[InstalledPart], str]  # the method name of a part, for messages


class Attached(Protocol):
    """What the checks read of another delta on the model."""

    name: str
    merged: bool
    _parts: list[InstalledPart]


def check_mergeable(
    name: str,
    parts: Sequence[InstalledPart],
    ledger: Ledger,
    method_of: MethodOf,
    others: Sequence[Attached],
) -> None:
    """Refuse, before anything changes, a part that cannot merge, or a scale (IA3) whose
    layer another unmerged delta also acts on (folding it in would change the output)."""
    refused = [part for part in parts if part.merge_fn is None]
    if refused:  # its merge() raises, saying why it cannot merge
        refused[0].merge(ledger, method_of(refused[0]))
    for part in parts:
        if not part.exclusive_merge:
            continue
        for other in others:
            if not other.merged and any(p.path == part.path for p in other._parts):
                raise DeltaStateError(
                    f"cannot merge delta {name!r}: its {method_of(part)} update on "
                    f"{part.path or '<root>'!r} scales the layer, and delta {other.name!r} "
                    "also acts there unmerged, so folding the scale into the weights would "
                    f"change the output; merge or detach {other.name!r} first, or keep "
                    f"{name!r} unmerged"
                )


def merge_in_order(parts: Sequence[InstalledPart], ledger: Ledger, method_of: MethodOf) -> None:
    """Merge every part, in merge order; if one fails, the ones merged before it are
    unmerged again (newest first) and the error goes on."""
    done = []
    try:  # merges write the stored tensors, under any redirect or parametrization
        for part in sorted(parts, key=lambda p: p.merge_order):
            done.append(part)
            part.merge(ledger, method_of(part))
    except BaseException:
        for part in reversed(done):
            part.unmerge(ledger)
        raise


def check_unmergeable(name: str, parts: Sequence[InstalledPart], ledger: Ledger) -> None:
    """Refuse to unmerge while another delta is merged into the same weights after it."""
    blocking = merged_on_top(ledger, [m for part in parts for m in part.merges])
    if blocking:
        raise DeltaStateError(
            f"cannot unmerge delta {name!r}: {blocking} merged into the same weights "
            f"after it; unmerge {blocking[-1]!r} first"
        )


def unmerge_in_order(parts: Sequence[InstalledPart], ledger: Ledger) -> None:
    """Restore the original weights, in the reverse of the merge order."""
    for part in reversed(sorted(parts, key=lambda p: p.merge_order)):
        part.unmerge(ledger)
