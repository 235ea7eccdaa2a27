"""The Delta: one attached set of delta tensors and its lifecycle.

A :class:`Delta` is an ``nn.Module`` so that it fits where modules fit (optimizers,
``state_dict``, ``requires_grad_``), but it owns no tensors itself: they are registered
on the modules they adapt, and every accessor looks them up there *now*
(:mod:`deltahooks.delta_tensors`). This module is the lifecycle: merge and unmerge
(:mod:`deltahooks.merge_steps`), enable and disable, save (:mod:`deltahooks.saving`),
reset, detach.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch
from torch import nn

from .delta_tensors import DeltaTensors
from .errors import DeltaStateError
from .formats import writer
from .ledger import Ledger
from .merge_steps import check_mergeable, check_unmergeable, merge_in_order, unmerge_in_order
from .planning import plan
from .registry import close_registry_if_empty, registry_of
from .saving import save_delta
from .sites import RedirectSite
from .switch import MergedGuard

if TYPE_CHECKING:
    from os import PathLike


def teardown(root: nn.Module, name: str, ledger: Ledger, freeze_base: bool) -> None:
    """Undo everything one delta added and forget it: the one way a delta leaves a model."""
    ledger.undo()
    registry = registry_of(root)
    if registry is not None:
        registry.deltas.pop(name, None)
        if freeze_base:
            registry.release(name)
        close_registry_if_empty(root)


class Delta(DeltaTensors):
    """Delta tensors attached to a model by :func:`deltahooks.attach`.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> delta = dh.attach(model, dh.LoRA(targets=["0"], r=2))
        >>> with delta.disabled():
        ...     pass  # the model computes as before attach here
        >>> delta.detach()
    """

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

    # ------------------------------------------------------------- lifecycle
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
        save_delta(path, self.name, self.specs, self._parts, self.state_dict())

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
            values = plan(self._root, tuple(self.specs)).values()
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
        registry = registry_of(self._root)
        others = [d for d in (registry.deltas.values() if registry else ()) if d is not self]
        check_mergeable(self.name, self._parts, self._ledger, self._method_of, others)
        try:
            merge_in_order(self._parts, self._ledger, self._method_of)
        except BaseException:  # the parts merged before the failure are unmerged already
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

    def unmerge(self) -> None:
        """Put the original weights back exactly (restored, not subtracted)."""
        self._require_attached("unmerge")
        if not self._switch.merged:
            return
        check_unmergeable(self.name, self._parts, self._ledger)
        self._ledger.remove(self.__dict__.pop("_guard"))
        unmerge_in_order(self._parts, self._ledger)
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
            method = self._method_of(part)
            counts[method] = counts.get(method, 0) + 1
        where = ", ".join(f"{m}×{n}" for m, n in counts.items())
        state = (
            "detached" if not self._attached else f"enabled={self.enabled}, merged={self.merged}"
        )
        return f"name={self.name!r}, parts=[{where}], {state}"
