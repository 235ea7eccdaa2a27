"""Bit-exact merges: fold a value into a module's own tensor, keep the original, restore it.

The original lives in a non-saved buffer next to the tensor (so ``model.to()`` moves it),
and unmerge puts that exact tensor back: never a subtraction. Merges into one tensor form
a stack shared by every delta on the model (kept in the model's registry): a delta can
only be unmerged when no other delta merged into the same tensors after it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .errors import DeltaStateError
from .ledger import Ledger, TensorEntry, join, reserved_name
from .registry import registry_of


class Merged(NamedTuple):
    path: str
    attr: str
    keep: TensorEntry  # the non-saved buffer holding the original


def _stack(ledger: Ledger, key: str, create: bool = False) -> list[str]:
    registry = registry_of(ledger.root)
    if registry is None:
        return []
    return (
        registry.merge_stacks.setdefault(key, []) if create else registry.merge_stacks.get(key, [])
    )


def swap_in(ledger: Ledger, path: str, attr: str, value: torch.Tensor) -> Merged:
    """Make the module's own ``attr`` hold ``value``; a parameter keeps its object."""
    module = ledger.module(path)
    key = join(path, attr)
    current = module._parameters.get(attr, module._buffers.get(attr))
    tied = [
        name
        for name, tensor in ledger.root.named_parameters(remove_duplicate=False)
        if tensor is current and name != key
    ]
    if tied:
        raise DeltaStateError(
            f"cannot merge into {key!r}: it is the same tensor as {tied} (tied weights), so "
            "merging would change those modules too; keep this delta unmerged"
        )
    registry = registry_of(ledger.root)
    for other in registry.deltas if registry is not None else ():
        copy = reserved_name(other, attr)
        holds_copy = copy in module._parameters or copy in module._buffers
        if other != ledger.delta_name and holds_copy and other not in _stack(ledger, key):
            raise DeltaStateError(
                f"cannot merge into {key!r}: delta {other!r} trains a Full copy of it that "
                f"replaces it in the forward; merge {other!r} first"
            )
    depth = 0  # several parts of one delta may merge into the same tensor
    while hasattr(module, reserved_name(ledger.delta_name, f"merge_original{depth}__{attr}")):
        depth += 1
    local = f"merge_original{depth}__{attr}"
    if attr in module._parameters:
        param = module._parameters[attr]
        keep = ledger.add_tensor(path, local, param.data, parameter=False, saved=False)
        param.data = value
    else:
        keep = ledger.add_tensor(path, local, module._buffers[attr], parameter=False, saved=False)
        module._buffers[attr] = value
    _stack(ledger, key, create=True).append(ledger.delta_name)
    return Merged(path, attr, keep)


def swap_out(ledger: Ledger, merged: Merged) -> None:
    """Put back the exact original that :func:`swap_in` kept."""
    module = ledger.module(merged.path)
    original = ledger.tensor(merged.keep)
    if merged.attr in module._parameters:
        module._parameters[merged.attr].data = original
    else:
        module._buffers[merged.attr] = original
    ledger.remove(merged.keep)
    stack = _stack(ledger, join(merged.path, merged.attr))
    if stack:
        stack.pop()
        if not stack:
            registry_of(ledger.root).merge_stacks.pop(join(merged.path, merged.attr), None)


def merged_on_top(ledger: Ledger, merges: list[Merged]) -> list[str]:
    """Other deltas that merged into these tensors later (they must be unmerged first)."""
    others: list[str] = []
    for merged in merges:
        for name in _stack(ledger, join(merged.path, merged.attr)):
            if name != ledger.delta_name and name not in others:
                stack = _stack(ledger, join(merged.path, merged.attr))
                if stack.index(name) > stack.index(ledger.delta_name):
                    others.append(name)
    return others
