"""Bit-exact merges: fold a value into a module's own tensor, keep the original, restore it.

The original lives in a non-saved buffer next to the tensor (so ``model.to()`` moves it),
and unmerge puts that exact tensor back: never a subtraction. Merges into one tensor form
a stack shared by every delta on the model (kept in the model's registry): a delta can
only be unmerged when no other delta merged into the same tensors after it.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from . import reparametrize
from .errors import DeltaStateError, UnsupportedOperationError
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


def storage(module: nn.Module, attr: str, path: str = "") -> tuple[nn.Module, str]:
    """Where ``module.<attr>`` is really stored: itself, or under deltahooks' own
    parametrization. A tensor the model itself parametrizes (``weight_norm``,
    ``spectral_norm``, a user's ``register_parametrization``) is computed from originals
    that no merged value can be written into exactly: :class:`UnsupportedOperationError`.
    """
    theirs = reparametrize.foreign(module, attr)
    if theirs:
        names = ", ".join(type(f).__name__ for f in theirs)
        raise UnsupportedOperationError(
            f"cannot merge into {join(path, attr)!r}: the model computes it through its own "
            f"parametrization ({names}; e.g. torch's weight_norm or spectral_norm), so a merged "
            "weight has no exact place among its originals; keep the delta unmerged, or remove "
            "that parametrization before attaching (torch.nn.utils.parametrize."
            f"remove_parametrizations(module, {attr!r}, leave_parametrized=True))"
        )
    if attr in module._parameters or attr in module._buffers:
        return module, attr
    if parametrize.is_parametrized(module, attr):
        return module.parametrizations[attr], "original"
    raise DeltaStateError(f"{type(module).__name__} has no tensor {attr!r} to merge into")


def stored(module: nn.Module, attr: str) -> torch.Tensor:
    """The tensor behind ``module.<attr>`` as the base model has it: no Full copy, none of
    deltahooks' parametrizations applied, the model's own (``weight_norm``, ...) applied.

    Example:
        >>> import torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> stored(layer, "weight") is layer.weight
        True
    """
    if reparametrize.foreign(module, attr):
        return reparametrize.base_value(module, attr)
    owner, name = storage(module, attr)
    return owner._parameters[name] if name in owner._parameters else owner._buffers[name]


def swap_in(ledger: Ledger, path: str, attr: str, value: torch.Tensor) -> Merged:
    """Make the module's own ``attr`` hold ``value``; a parameter keeps its object."""
    module = ledger.module(path)
    key = join(path, attr)
    owner, name = storage(module, attr, path)
    current = stored(module, attr)
    aliases = {key, join(path, f"parametrizations.{attr}.original")}
    tied = [
        other
        for other, tensor in ledger.root.named_parameters(remove_duplicate=False)
        if tensor is current and other not in aliases
    ]
    if tied:
        raise DeltaStateError(
            f"cannot merge into {key!r}: it is the same tensor as {tied} (tied weights), so "
            "merging would change those modules too; keep this delta unmerged"
        )
    registry = registry_of(ledger.root)
    for other, delta in registry.deltas.items() if registry is not None else ():
        replaced = other != ledger.delta_name and delta.redirects(path, attr)
        if replaced and other not in _stack(ledger, key):
            raise DeltaStateError(
                f"cannot merge into {key!r}: delta {other!r} trains a Full copy of it that "
                f"replaces it in the forward; merge {other!r} first"
            )
    depth = 0  # several parts of one delta may merge into the same tensor
    while hasattr(module, reserved_name(ledger.delta_name, f"merge_original{depth}__{attr}")):
        depth += 1
    local = f"merge_original{depth}__{attr}"
    if name in owner._parameters:
        param = owner._parameters[name]
        keep = ledger.add_tensor(path, local, param.data, parameter=False, saved=False)
        param.data = value
    else:
        keep = ledger.add_tensor(path, local, owner._buffers[name], parameter=False, saved=False)
        owner._buffers[name] = value
    _stack(ledger, key, create=True).append(ledger.delta_name)
    return Merged(path, attr, keep)


def swap_out(ledger: Ledger, merged: Merged) -> None:
    """Put back the exact original that :func:`swap_in` kept."""
    owner, name = storage(ledger.module(merged.path), merged.attr)
    original = ledger.tensor(merged.keep)
    if name in owner._parameters:
        owner._parameters[name].data = original
    else:
        owner._buffers[name] = original
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
