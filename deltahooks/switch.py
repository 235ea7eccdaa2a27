"""A delta's switch: the state every one of its hooks reads on each call.

Enabling, disabling and routing a delta change this one object instead of adding or
removing hooks, so they are cheap and leave compiled graphs in place; merging sets it too
(and takes the sites away, keeping only :class:`MergedGuard`).
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from .errors import DeltaStateError


class Switch:
    """State every hook of one delta reads on each call: flipping it adds no hooks.

    ``gate`` is ``active`` as a 0-dim bool tensor, changed in place: compiled code
    selects with it instead of branching on ``active``, so enabling or disabling a delta
    under ``torch.compile`` reuses the graph instead of recompiling it.

    ``rows`` is ``None`` except under per-sample routing (:func:`deltahooks.route`): then
    a :class:`RowSelection` saying which rows of the batch the delta acts on, and output
    and input sites compute on those rows only.
    """

    __slots__ = ("active", "enabled", "gate", "merged", "name", "rows")

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = True
        self.merged = False
        self.active = True
        self.gate = torch.ones((), dtype=torch.bool)
        self.rows: RowSelection | None = None

    def update(self) -> None:
        self.active = self.enabled and not self.merged
        self.gate.fill_(self.active)

    def __getstate__(self):
        return (self.name, self.enabled, self.merged, self.active)

    def __setstate__(self, state) -> None:
        self.name, self.enabled, self.merged, self.active = state
        self.gate = torch.tensor(self.active)
        self.rows = None


class RowSelection(Protocol):
    """Which rows of a batch a routed delta acts on (see :mod:`deltahooks.routing`)."""

    def index(self, batch: int, device: torch.device, module: nn.Module) -> torch.Tensor | None:
        """Row indices into a batch of ``batch`` rows on ``device``; ``None``: every row.

        Raises a :class:`DeltaError` when ``batch`` does not fit the routed rows.
        """


def gated(switch: Switch, new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """``new`` while the delta is active, else ``old``, decided inside a compiled graph."""
    return torch.where(switch.gate.to(old.device), new, old)


class MergedGuard:
    """The one hook a merged delta keeps, on its root: training it would change nothing."""

    __slots__ = ("switch",)

    def __init__(self, switch: Switch) -> None:
        self.switch = switch

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if module.training and torch.is_grad_enabled():
            raise DeltaStateError(
                f"delta {self.switch.name!r} is merged, so training would not update it; "
                "call delta.unmerge() before training, or model.eval() / torch.no_grad() "
                "for inference"
            )
