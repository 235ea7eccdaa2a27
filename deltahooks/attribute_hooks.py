"""The hooks that run attribute sites: what ``module.<attr>`` reads while a delta is on.

- a :class:`~deltahooks.sites.WeightSite` becomes a :class:`WeightFunction`, a
  ``torch.nn.utils.parametrize`` parametrization (with a :class:`CallMemo` when it is
  computed once per call);
- a :class:`~deltahooks.sites.RedirectSite` becomes instance-``__dict__`` entries that
  shadow the module's attributes, kept pointing at the live tensors by a
  :class:`RedirectHook`;
- a :class:`~deltahooks.sites.FlagSite` becomes an :class:`ActiveFlag`.
"""

from __future__ import annotations

import threading

import torch
from torch import nn

from .runner import TensorSource, call_explained, in_dtype_of, refuse_meta
from .sites import WeightSite
from .switch import Switch, gated


class CallMemo:
    """One value kept while a module call runs, per thread (``WeightSite.once_per_call``).

    ``open``/``close`` bracket the call (a pre-hook and an always-called forward hook);
    outside a call nothing is kept. Copies start empty.
    """

    def __init__(self) -> None:
        self.local = threading.local()

    def open(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self.local.depth = getattr(self.local, "depth", 0) + 1

    def close(self, *_) -> None:
        if not torch.compiler.is_compiling():
            self.local.depth = max(getattr(self.local, "depth", 0) - 1, 0)
            if not self.local.depth:
                self.local.value = None

    def get(self) -> torch.Tensor | None:
        return getattr(self.local, "value", None)

    def put(self, value: torch.Tensor) -> None:
        if getattr(self.local, "depth", 0):
            self.local.value = value

    def __deepcopy__(self, memo) -> CallMemo:
        return CallMemo()

    def __reduce__(self):  # a pickled copy starts empty (a None state would skip setstate)
        return CallMemo, ()


class WeightFunction(nn.Module):
    """The parametrization of a :class:`WeightSite`: ``W ↦ fn(W, tensors)`` while active.

    The hooked module is held in ``__dict__`` (not as a submodule) so its tensors are
    looked up at call time without making the module its own descendant.
    """

    def __init__(
        self,
        site: WeightSite,
        switch: Switch,
        source: TensorSource,
        owner: nn.Module,
        memo: CallMemo | None = None,
    ):
        super().__init__()
        self.__dict__["fn"] = site.fn
        self.__dict__["switch"] = switch
        self.__dict__["source"] = source
        self.__dict__["owner"] = owner
        self.__dict__["memo"] = memo

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        compiling = torch.compiler.is_compiling()
        if not compiling and not self.switch.active:
            return weight
        memo = None if compiling else self.memo
        if memo is not None:
            kept = memo.get()
            if kept is not None:
                return kept
        tensors = self.source.gather(self.owner)
        refuse_meta(self.switch, self.owner, weight, tensors)
        tensors = in_dtype_of(tensors, weight)
        new = call_explained(self.switch, self.owner, weight, tensors, self.fn, weight, tensors)
        if memo is not None:
            memo.put(new)
        return gated(self.switch, new, weight) if compiling else new


class RedirectHook:
    """Forward pre-hook of a :class:`RedirectSite` on one owner module."""

    __slots__ = ("pairs", "switch")

    def __init__(self, switch: Switch, pairs: list[tuple[str, str, bool]]):
        self.switch = switch
        self.pairs = pairs  # (attribute, reserved name, is a parameter)

    def __call__(self, module: nn.Module, args: tuple) -> None:
        active = self.switch.active
        apply_redirect(module, active, self.pairs)
        if active and args and isinstance(args[0], torch.Tensor):
            copy = module.__dict__[self.pairs[0][0]]
            refuse_meta(self.switch, module, args[0], (copy,))


class ActiveFlag:
    """True while its delta is active: the value a :class:`FlagSite` gives an attribute."""

    __slots__ = ("switch",)

    def __init__(self, switch: Switch) -> None:
        self.switch = switch

    def __bool__(self) -> bool:
        return self.switch.active

    def __repr__(self) -> str:
        return f"ActiveFlag({self.switch.name!r}: {bool(self)})"

    def __getstate__(self):
        return self.switch

    def __setstate__(self, switch) -> None:
        self.switch = switch


def apply_redirect(module: nn.Module, active: bool, pairs) -> None:
    """Point ``module``'s shadowing attributes at the part's tensors (active) or drop them.

    ``pairs`` are ``(attribute, reserved name, is a parameter)``.
    """
    shadows = module.__dict__
    if active:
        for attr, reserved, is_parameter in pairs:
            store = module._parameters if is_parameter else module._buffers
            shadows[attr] = store[reserved]
    else:
        for attr, _, _ in pairs:
            shadows.pop(attr, None)
