"""The tensors of a Delta: where they live and how they are read and written.

A delta owns no tensors itself: they are registered on the modules they adapt, and every
accessor here looks them up there *now*, through the ledger. That keeps one copy of each
tensor, lets ``model.to()``/FSDP2 move or shard them with their layer, and means the
delta never holds the model as a submodule (no reference cycle in ``named_modules``).
:class:`~deltahooks.delta.Delta` adds the lifecycle (merge, disable, save, detach).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from .distributed import shaped_like
from .errors import DeltaStateError, UnsupportedOperationError
from .fitting import fitting_pairs
from .install import InstalledPart
from .ledger import Ledger, TensorEntry
from .spec import DeltaSpec
from .switch import Switch

if TYPE_CHECKING:
    from .liveness import Watch


class LoadResult(NamedTuple):
    missing_keys: list[str]
    unexpected_keys: list[str]


class PartView(NamedTuple):
    """A read-only view of one part: which method sits where, and its live tensors."""

    method: str
    path: str  # the module the part acts on
    spec_index: int
    tensors: dict[str, torch.Tensor]  # delta state_dict key -> live tensor
    target: str = ""  # what it was resolved from: ``path``, or a parameter path on it
    note: str = ""  # how it acts when that is not the method's usual way (summaries say it)


class DeltaTensors(nn.Module):
    """The accessors of a :class:`~deltahooks.delta.Delta`'s tensors, looked up live on the
    model (an ``nn.Module`` so that it fits where modules fit: optimizers, ``state_dict``,
    ``requires_grad_``)."""

    def __init__(
        self,
        root: nn.Module,
        name: str,
        specs: tuple[DeltaSpec, ...],
        parts: list[InstalledPart],
        shared: list[TensorEntry],
        ledger: Ledger,
        switch: Switch,
        freeze_base: bool,
        watch: Watch | None = None,
    ) -> None:
        super().__init__()
        # plain attributes (not submodules): the model must not become our child
        state = self.__dict__
        state["_root"] = root
        state["_ledger"] = ledger
        state["_switch"] = switch
        state["_parts"] = parts
        state["_shared"] = shared
        state["_freeze_base"] = freeze_base
        state["_watch"] = watch  # the liveness checks (deltahooks.liveness), until settled
        state["_attached"] = True
        state["name"] = name
        state["specs"] = specs

    @property
    def model(self) -> nn.Module:
        """The root module this delta was attached to."""
        return self._root

    @property
    def paths(self) -> list[str]:
        """The target paths, one per part, in attach order: a module path, or for a part
        that adapts one parameter, that parameter's path (``experts.gate_up_proj``)."""
        return [part.target for part in self._parts]

    @property
    def parts(self) -> list[PartView]:
        """``(method, path, spec_index, tensors)`` for each part, in attach order.

        ``tensors`` maps this delta's ``state_dict`` keys to the part's live tensors.
        """
        views = []
        for part in self._parts:
            tensors = {
                entry.key: self._ledger.tensor(entry) for entry in part.entries if entry.saved
            }
            method = self._method_of(part)
            views.append(
                PartView(method, part.path, part.spec_index, tensors, part.target, part.note)
            )
        return views

    @property
    def shared(self) -> dict[str, torch.Tensor]:
        """Tensors shared by all targets of a spec (stored once, on the model root)."""
        return {entry.key: self._ledger.tensor(entry) for entry in self._shared if entry.saved}

    def _require_attached(self, action: str) -> None:
        if not self._attached:
            raise DeltaStateError(
                f"cannot {action}: delta {self.name!r} is detached; attach a new one with "
                "deltahooks.attach(...) or deltahooks.load(...)"
            )

    # --------------------------------------------------------------- tensors
    def _entries(self):
        yield from self._shared
        for part in self._parts:
            yield from part.entries

    def named_parameters(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, nn.Parameter]]:
        """The delta's trainable tensors, keyed by target path (e.g. ``q_proj.lora_A``)."""
        for entry in self._entries():
            if entry.is_parameter:
                yield prefix + entry.key, self._ledger.tensor(entry)

    def named_buffers(
        self, prefix: str = "", recurse: bool = True, remove_duplicate: bool = True
    ) -> Iterator[tuple[str, torch.Tensor]]:
        for entry in self._entries():
            if not entry.is_parameter:
                yield prefix + entry.key, self._ledger.tensor(entry)

    def state_dict(self, *args, destination=None, prefix: str = "", keep_vars: bool = False):
        """Only the delta's tensors, keyed by the target module's path."""
        self._require_attached("read state_dict")
        out = OrderedDict() if destination is None else destination
        for entry in self._entries():
            if entry.saved:
                tensor = self._ledger.tensor(entry)
                out[prefix + entry.key] = tensor if keep_vars else tensor.detach()
        return out

    @torch.no_grad()
    def load_state_dict(
        self, state_dict: Mapping[str, torch.Tensor], strict: bool = True, assign: bool = False
    ) -> LoadResult:
        """Copy tensors into the delta (cast to its dtype/device); shapes must match."""
        self._require_attached("load_state_dict")
        if assign:
            raise UnsupportedOperationError(
                "assign=True would replace the registered tensors; deltahooks copies values"
            )
        own = {entry.key: self._ledger.tensor(entry) for entry in self._entries() if entry.saved}
        pairs, missing, unexpected = fitting_pairs(self.name, own, state_dict, strict)
        shaped = [(target, shaped_like(target, value)) for target, value in pairs]
        for target, value in shaped:  # all checked first: all-or-nothing
            target.copy_(value)
        return LoadResult(missing, unexpected)

    def forward(self, *args, **kwargs):
        raise TypeError("a Delta is not called itself; call the model it is attached to")

    def _method_of(self, part: InstalledPart) -> str:
        return self.specs[part.spec_index].method
