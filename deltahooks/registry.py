"""Which deltas sit on a model, and the ``requires_grad`` flags they froze.

The registry lives in the root module's instance ``__dict__`` (not as a submodule,
parameter or buffer), so ``state_dict`` and the module tree are untouched, while
``copy.deepcopy`` and pickling carry it along with the model. It disappears when
the last delta is detached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from .errors import DeltaStateError
from .ledger import is_reserved

if TYPE_CHECKING:
    from .delta import Delta

_KEY = "_deltahooks_registry"


class ModelRegistry:
    """Per-root bookkeeping shared by every delta attached with that root."""

    def __init__(self) -> None:
        self.deltas: dict[str, Delta] = {}
        # original requires_grad of every base parameter frozen by a freeze_base delta;
        # restored when the last such delta detaches, whatever the detach order.
        self.frozen: dict[nn.Parameter, bool] = {}
        self.freezers: set[str] = set()
        # tensor path -> names of the deltas merged into it, in merge order
        self.merge_stacks: dict[str, list[str]] = {}

    def freeze_base(self, root: nn.Module, delta_name: str) -> None:
        for name, param in root.named_parameters():
            if is_reserved(name):
                continue
            self.frozen.setdefault(param, param.requires_grad)
            param.requires_grad_(False)
        self.freezers.add(delta_name)

    def release(self, delta_name: str) -> None:
        self.freezers.discard(delta_name)
        if not self.freezers:
            for param, flag in self.frozen.items():
                param.requires_grad_(flag)
            self.frozen.clear()


def registry_of(root: nn.Module) -> ModelRegistry | None:
    return root.__dict__.get(_KEY)


def refuse_nested_roots(found: list[tuple[str, nn.Module, ModelRegistry]]) -> None:
    """Refuse a new root when a submodule already carries deltas attached with it as the
    root. ``found`` is :func:`registries_under` of the new delta's root, read once."""
    if any(path == "" for path, _, _ in found):
        return  # the root has a registry already: its deltas were checked when it opened
    for path, _, other in found:
        if path and other.deltas:
            raise DeltaStateError(
                f"submodule {path!r} already carries deltas {sorted(other.deltas)} attached "
                "with it as the root; attach every delta of one model to the same root module"
            )


def admit(root: nn.Module, name: str, delta: Delta, freeze_base: bool) -> None:
    """Record an attached delta in the root's registry (opened on first use) and, for a
    ``freeze_base`` delta, freeze the base parameters."""
    registry = registry_of(root)
    if registry is None:
        registry = root.__dict__[_KEY] = ModelRegistry()
    registry.deltas[name] = delta
    if freeze_base:
        registry.freeze_base(root, name)


def close_registry_if_empty(root: nn.Module) -> None:
    registry = registry_of(root)
    if registry is not None and not registry.deltas:
        del root.__dict__[_KEY]


def registries_under(model: nn.Module):
    """Every registry on ``model`` or its submodules, with the path of its root."""
    for path, module in model.named_modules():
        registry = registry_of(module)
        if registry is not None:
            yield path, module, registry
