"""The Delta: one attached set of delta tensors and its lifecycle.

A :class:`Delta` is an ``nn.Module`` so that it fits where modules fit (optimizers,
``state_dict``, ``requires_grad_``), but it owns no tensors itself: they are registered
on the modules they adapt, and every accessor looks them up there *now*. That keeps
one copy of each tensor, lets ``model.to()``/FSDP2 move or shard them with their layer,
and means the delta never holds the model as a submodule (no reference cycle in
``named_modules``).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, NamedTuple

import torch
from torch import nn

from .distributed import gathered, shaped_like, writes
from .errors import DeltaFileError, DeltaStateError, UnsupportedOperationError
from .formats import writer
from .install import InstalledPart
from .io import write_delta
from .ledger import Ledger, TensorEntry
from .merging import merged_on_top
from .planning import plan
from .registry import close_registry_if_empty, registry_of
from .sites import RedirectSite
from .spec import DeltaSpec
from .switch import MergedGuard, Switch

if TYPE_CHECKING:
    from os import PathLike

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


def teardown(root: nn.Module, name: str, ledger: Ledger, freeze_base: bool) -> None:
    """Undo everything one delta added and forget it: the one way a delta leaves a model."""
    ledger.undo()
    registry = registry_of(root)
    if registry is not None:
        registry.deltas.pop(name, None)
        if freeze_base:
            registry.release(name)
        close_registry_if_empty(root)


class Delta(nn.Module):
    """Delta tensors attached to a model by :func:`deltahooks.attach`.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))
        >>> with delta.disabled():
        ...     pass  # the model computes as before attach here
        >>> delta.detach()
    """

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

    # ----------------------------------------------------------------- state
    @property
    def attached(self) -> bool:
        return self._attached

    @property
    def enabled(self) -> bool:
        return self._switch.enabled

    @property
    def merged(self) -> bool:
        return self._switch.merged

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
            method = self.specs[part.spec_index].method
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
        own = {entry.key: entry for entry in self._entries() if entry.saved}
        missing = [key for key in own if key not in state_dict]
        unexpected = [key for key in state_dict if key not in own]
        if strict and (missing or unexpected):
            raise DeltaFileError(
                f"delta {self.name!r} state_dict does not fit: missing keys {missing[:10]}, "
                f"unexpected keys {unexpected[:10]}; pass strict=False to load the overlap"
            )
        pairs = []
        for key, entry in own.items():
            if key not in state_dict:
                continue
            target = self._ledger.tensor(entry)
            value = state_dict[key]
            if tuple(value.shape) != tuple(target.shape):
                raise DeltaFileError(
                    f"tensor {key!r} has shape {list(value.shape)}, but the delta expects "
                    f"{list(target.shape)}; was it saved with another rank or model?"
                )
            if value.is_floating_point() != target.is_floating_point():
                raise DeltaFileError(
                    f"tensor {key!r} has dtype {value.dtype}, but the delta holds {target.dtype}"
                )
            pairs.append((target, shaped_like(target, value)))
        for target, value in pairs:  # all checked first: all-or-nothing
            target.copy_(value)
        return LoadResult(missing, unexpected)

    # ------------------------------------------------------------- lifecycle
    def forward(self, *args, **kwargs):
        raise TypeError("a Delta is not called itself; call the model it is attached to")

    def save(self, path: str | PathLike) -> None:
        """Write only the delta (tensors + spec + format version) to a ``.safetensors`` file.

        On a model sharded with FSDP2 call it on every rank: the shards are gathered
        (a collective) and rank 0 writes the file.

        Example:
            >>> import os, tempfile, torch, deltahooks as dh
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> path = os.path.join(tempfile.mkdtemp(), "lora.safetensors")
            >>> dh.attach(model, dh.LoRA(targets=["0"], r=2)).save(path)
        """
        self._require_attached("save")
        paths: list[list[str]] = [[] for _ in self.specs]
        keys: list[set[str]] = [set() for _ in self.specs]
        for part in self._parts:
            paths[part.spec_index].append(part.target)
            entries = [*part.shared.values(), *part.entries]
            keys[part.spec_index].update(entry.key for entry in entries if entry.saved)
        state, sharded = gathered(self.state_dict())  # FSDP2: a collective, on every rank
        parts, stored = [], {}
        with torch.no_grad():  # each spec says what of it a file keeps (spec.saved)
            for spec, where, own in zip(self.specs, paths, keys):
                kept, tensors = spec.saved({k: v for k, v in state.items() if k in own})
                parts.append({**kept.describe(), "paths": where})
                stored.update(tensors)
        if writes(sharded):
            write_delta(path, self.name, parts, stored)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Initialise every delta tensor again as its method does at attach, in place.

        For a delta attached to a model built on the ``meta`` device: after
        ``model.to_empty(device=...)`` and loading the base weights, this gives the delta
        its starting values (methods that start from the base weights, such as PiSSA,
        read them now).

        Example:
            >>> import torch, deltahooks as dh
            >>> with torch.device("meta"):
            ...     model = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))
            >>> _ = model.to_empty(device="cpu")
            >>> _ = model.load_state_dict({"0.weight": torch.eye(4), "0.bias": torch.zeros(4)})
            >>> delta.reset_parameters()
            >>> bool(delta.state_dict()["0.lora_B"].eq(0).all())  # LoRA's B starts at zero
            True
        """
        self._require_attached("reset_parameters")
        if self._switch.merged:
            raise DeltaStateError(
                f"delta {self.name!r} is merged into the weights; call delta.unmerge() before "
                "delta.reset_parameters()"
            )
        with self.disabled():  # methods that start from the weights read the base's own
            fresh = plan(self._root, tuple(self.specs))
        values = {}
        for shared in fresh.shared:
            values.update({("", local): item.tensor for local, item in shared.items()})
        for part in fresh.parts:
            values.update({key: value for key, (value, _) in part.tensors.items()})
        for entry in self._entries():
            self._ledger.tensor(entry).copy_(values[(entry.path, entry.local)])

    def to(self, *args, **kwargs) -> Delta:
        """Move or cast the delta's own tensors (not the model's), in place.

        ``delta.to(torch.float32)`` on a bfloat16 model keeps full-precision delta weights
        (the hooks compute in the activations' dtype, gradients arrive in float32); the
        Parameter objects stay the same. Buffers rebuilt from the base weights (PiSSA's
        residual) keep the base's dtype.

        Example:
            >>> import torch, deltahooks as dh
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4)).bfloat16()
            >>> delta = dh.attach(model, dh.LoRA(targets=["0"], r=2)).to(torch.float32)
            >>> delta.state_dict()["0.lora_A"].dtype, model[0].weight.dtype
            (torch.float32, torch.bfloat16)
        """
        self._require_attached("to")
        device, dtype, non_blocking, _ = torch._C._nn._parse_to(*args, **kwargs)
        with torch.no_grad():
            for entry in self._entries():
                tensor = self._ledger.tensor(entry)
                cast = dtype if (dtype is not None and tensor.is_floating_point()) else None
                if not entry.saved:
                    cast = None
                tensor.data = tensor.data.to(device=device, dtype=cast, non_blocking=non_blocking)
        return self

    def save_peft(self, directory: str | PathLike, *, task_type: str | None = None) -> None:
        """Write a PEFT adapter directory that ``peft.PeftModel.from_pretrained`` loads.

        See :func:`deltahooks.save_peft`.

        Example::

            delta.save_peft("my-adapter/")
        """
        writer("peft")(self, directory, task_type=task_type)

    def detach(self) -> None:
        """Remove everything this delta added; the model is exactly what it was before."""
        self._require_attached("detach")
        if self._switch.merged:
            self.unmerge()
        teardown(self._root, self.name, self._ledger, self._freeze_base)
        self.__dict__["_attached"] = False

    def merge(self) -> None:
        """Fold the delta into the base weights: a forward then costs what the base costs.

        The originals are kept (not recomputed), so :meth:`unmerge` and :meth:`detach`
        restore them bit-exactly. Merging twice is a no-op.
        """
        self._require_attached("merge")
        if self._switch.merged:
            return
        if not self._switch.enabled:
            raise DeltaStateError(
                f"delta {self.name!r} is disabled, so merging it would change the forward; "
                "call delta.enable() first"
            )
        training = [part.path for part in self._parts if self._ledger.module(part.path).training]
        if training:
            raise DeltaStateError(
                f"cannot merge delta {self.name!r} while {training[0]!r} is in training mode: "
                "later training steps would not reach the merged weights; call model.eval() first"
            )
        self._merge()

    def _merge(self) -> None:
        refused = [p for p in self._parts if p.merge_fn is None]
        if refused:  # before anything changes
            refused[0].merge(self._ledger, self.specs[refused[0].spec_index].method)
        self._check_exclusive_merges()
        done = []
        try:  # merges write the stored tensors, under any redirect or parametrization
            for part in sorted(self._parts, key=lambda p: p.merge_order):
                done.append(part)
                part.merge(self._ledger, self.specs[part.spec_index].method)
        except BaseException:
            for part in reversed(done):
                part.unmerge(self._ledger)
            self._set(merged=False)
            raise
        self._set(merged=True)
        for part in self._parts:  # then the sites go: the weights alone compute the delta
            part.remove_sites(self._ledger)
        if self._watch is not None:  # and the liveness checks (resumed on unmerge)
            self._watch.pause()
        self.__dict__["_guard"] = self._ledger.forward_pre_hook("", MergedGuard(self._switch))

    def redirects(self, path: str, attr: str) -> bool:
        """Whether this delta makes ``<path>.<attr>`` read a copy of its own (``Full``)."""
        return any(
            (path, attr) in site.keys
            for part in self._parts
            for site in part.sites
            if isinstance(site, RedirectSite)
        )

    def _check_exclusive_merges(self) -> None:
        registry = registry_of(self._root)
        others = [d for d in (registry.deltas.values() if registry else ()) if d is not self]
        for part in self._parts:
            if not part.exclusive_merge:
                continue
            for other in others:
                if not other.merged and any(p.path == part.path for p in other._parts):
                    method = self.specs[part.spec_index].method
                    raise DeltaStateError(
                        f"cannot merge delta {self.name!r}: its {method} update on "
                        f"{part.path or '<root>'!r} scales the layer, and delta {other.name!r} "
                        "also acts there unmerged, so folding the scale into the weights would "
                        f"change the output; merge or detach {other.name!r} first, or keep "
                        f"{self.name!r} unmerged"
                    )

    def unmerge(self) -> None:
        """Put the original weights back exactly (restored, not subtracted)."""
        self._require_attached("unmerge")
        if not self._switch.merged:
            return
        blocking = merged_on_top(self._ledger, [m for part in self._parts for m in part.merges])
        if blocking:
            raise DeltaStateError(
                f"cannot unmerge delta {self.name!r}: {blocking} merged into the same weights "
                f"after it; unmerge {blocking[-1]!r} first"
            )
        self._ledger.remove(self.__dict__.pop("_guard"))
        for part in reversed(sorted(self._parts, key=lambda p: p.merge_order)):
            part.unmerge(self._ledger)
        for part in self._parts:
            part.install_sites(self._ledger, self._switch)
        if self._watch is not None:
            self._watch.resume()
        self._set(merged=False)

    def enable(self) -> None:
        self._require_attached("enable")
        self._set(enabled=True)

    def disable(self) -> None:
        """Make the model compute as if the delta were absent, without removing hooks.

        A merged delta is part of the weights: unmerge it first (or use :meth:`disabled`,
        which unmerges and merges back for you).
        """
        self._require_attached("disable")
        if self._switch.merged:
            raise DeltaStateError(
                f"delta {self.name!r} is merged into the weights; call delta.unmerge() before "
                "delta.disable(), or use `with delta.disabled():`"
            )
        self._set(enabled=False)

    @contextlib.contextmanager
    def disabled(self):
        """Context manager: base behaviour inside, the delta back outside.

        Example:
            >>> import torch, deltahooks as dh
            >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
            >>> delta = dh.attach(model, dh.LoRA(targets=["0"], init="random"))
            >>> x = torch.randn(2, 4)
            >>> with delta.disabled():
            ...     base = model(x)
            >>> bool(torch.equal(base, torch.nn.functional.linear(x, model[0].weight, model[0].bias)))
            True
        """
        self._require_attached("disable")
        was_enabled, was_merged = self._switch.enabled, self._switch.merged
        if was_merged:
            self.unmerge()
        self._set(enabled=False)
        try:
            yield self
        finally:
            if self._attached:
                self._set(enabled=was_enabled)
                if was_merged:
                    self._merge()

    def _set(self, *, enabled: bool | None = None, merged: bool | None = None) -> None:
        switch = self._switch
        if enabled is not None:
            switch.enabled = enabled
        if merged is not None:
            switch.merged = merged
        switch.update()
        for part in self._parts:
            part.sync(self._ledger, switch)

    def extra_repr(self) -> str:
        counts: dict[str, int] = {}
        for part in self._parts:
            method = self.specs[part.spec_index].method
            counts[method] = counts.get(method, 0) + 1
        where = ", ".join(f"{m}×{n}" for m, n in counts.items())
        state = (
            "detached" if not self._attached else f"enabled={self.enabled}, merged={self.merged}"
        )
        return f"name={self.name!r}, parts=[{where}], {state}"
