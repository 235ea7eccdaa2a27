"""Sites: where a method acts on a module, and the one runner every hook goes through.

A method declares sites and supplies pure functions; the runner does the chores every
hook shares: it skips work while the delta is disabled or merged, looks the method's
tensors up on the module *now* (never captured: FSDP2 and ``model.to`` replace them),
refuses meta-device tensors next to real inputs, turns a failure into an error that says
what to fix, and tells an output function when it may write into the output in place.

- :class:`OutputSite` — forward hook: ``y ← fn(module, x, y, tensors, writable)``;
- :class:`InputSite` — forward pre-hook: ``x ← fn(module, x, tensors)``;
- :class:`WeightSite` — ``torch.nn.utils.parametrize``: ``W ← fn(W, tensors)``;
- :class:`RootCallSite` — pre-hook on the model root (or another module named by its path)
  that may rewrite the whole call: ``(args, kwargs) ← fn(module, args, kwargs, tensors)``;
- :class:`FlagSite` — a module attribute that reads true while the delta is active (a
  switch library code checks, such as transformers' ``_can_checkpoint_with_cache``).

``tensors`` is a tuple in the order the site names them. Outputs that are tuples (decoder
layers) or ``ModelOutput``-like mappings are acted on through their first element (the
hidden state); the rest passes through.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .errors import DeltaStateError, UnsupportedModuleError
from .ledger import Ledger


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


# ----------------------------------------------------------------- site declarations
@dataclass(frozen=True)
class OutputSite:
    """Act on the module's output. ``fn(module, x, y, tensors, writable) -> new y``.

    ``x`` is the module's first input. With ``in_place=True`` the runner passes
    ``writable=True`` when no other hook has seen ``y`` yet, so ``fn`` may accumulate into
    it instead of allocating a new tensor. ``prepend=True`` runs before other forward
    hooks of the module (an update that is part of the layer itself, like LoRA's).
    """

    fn: Callable
    tensors: tuple[str, ...] = ()
    in_place: bool = False
    prepend: bool = False


@dataclass(frozen=True)
class InputSite:
    """Act on the module's first input before it runs. ``fn(module, x, tensors) -> new x``."""

    fn: Callable
    tensors: tuple[str, ...] = ()


@dataclass(frozen=True)
class WeightSite:
    """Reparametrize a module tensor: ``fn(W, tensors) -> new W``, via ``parametrize``.

    The module's own forward (and any code reading ``module.<attr>``) sees the new value;
    the base model's ``state_dict`` keys and order are unchanged while attached.
    ``once_per_call=True`` computes it once per call of the module, however often its
    forward reads the attribute (an MoE experts module indexes its weight stack once per
    expert): the value is kept for the call, per thread, and dropped when it returns.
    """

    fn: Callable
    attr: str = "weight"
    tensors: tuple[str, ...] = ()
    once_per_call: bool = False


@dataclass(frozen=True)
class RootCallSite:
    """Rewrite a call: ``fn(module, args, kwargs, tensors) -> (args, kwargs)`` (or ``None``:
    the call as it is).

    For methods that change what the model is called with (prompts, prefixes, masks).
    The pre-hook sits on ``module``, a path from the model root: ``""`` (the default) is
    the root itself; another path reaches a module that is called on its own, such as
    the encoder that an encoder-decoder ``generate()`` runs before the model. ``fn``
    gets that module; the part's tensors are looked up on the part's target wherever
    the hook sits.
    """

    fn: Callable
    tensors: tuple[str, ...] = ()
    module: str = ""


@dataclass(frozen=True)
class RedirectSite:
    """Make module attributes read the part's tensors instead (``module.weight`` → a copy).

    ``keys`` are ``(owner path, name)`` of the part's tensors; the module at ``owner path``
    then resolves its attribute ``name`` to that tensor through an instance-``__dict__``
    entry, so its own forward uses it at no cost, while ``state_dict()`` and ``detach``
    still see the originals. A pre-hook re-points it on every call (FSDP2 and
    ``model.to`` may replace the registered tensor).
    """

    keys: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class FlagSite:
    """Make ``module.<attr>`` read true while the delta is active, on each module in ``modules``.

    ``modules`` are paths from the model root. The attribute is an instance attribute
    whose truth follows the delta's switch (disabled or merged: false), so code that reads
    it at call time sees the delta's state without any hook; detach removes it.
    """

    attr: str
    modules: tuple[str, ...]
    tensors: tuple[str, ...] = ()


Site = OutputSite | InputSite | WeightSite | RootCallSite | RedirectSite | FlagSite


# ---------------------------------------------------------------------- the runner
class TensorSource:
    """Finds a site's tensors at call time: on the hooked module, or shared on the root."""

    __slots__ = ("names", "root")

    def __init__(self, names: tuple[tuple[bool, bool, str], ...], root: nn.Module | None):
        self.names = names  # (on the root, is a parameter, reserved name)
        self.root = root

    def gather(self, module: nn.Module) -> tuple[torch.Tensor, ...]:
        out = []
        for shared, is_parameter, name in self.names:
            owner = self.root if shared else module
            out.append((owner._parameters if is_parameter else owner._buffers)[name])
        return tuple(out)


def first_tensor(value: Any) -> torch.Tensor | None:
    """The hidden state of a module's output or input: the tensor, or the first element."""
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping) and value:
        first = next(iter(value.values()))
        return first if isinstance(first, torch.Tensor) else None
    return None


def with_first(value: Any, new: torch.Tensor) -> Any:
    """``value`` with its hidden state replaced by ``new`` (same container type)."""
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        rest = value[1:]
        return type(value)((new, *rest)) if type(value) is not tuple else (new, *rest)
    if isinstance(value, list):
        return [new, *value[1:]]
    key = next(iter(value))
    return type(value)(**{**value, key: new})


def explain_failure(
    delta_name: str, module: nn.Module, x: Any, tensors: tuple, err: Exception | None
) -> Exception | None:
    """An error that says what to fix for a failure inside a hook, when we can tell.

    Only called after something went wrong, so the hot path pays nothing for it.
    """
    devices = {t.device for t in tensors}
    if isinstance(x, torch.Tensor) and (devices - {x.device}):
        where = sorted(str(d) for d in devices)
        if "meta" in where and x.device.type != "meta":
            return DeltaStateError(
                f"delta {delta_name!r} on {type(module).__name__} has its tensors on the meta "
                "device (no values) while the input is real: load its values with dh.load(...) "
                "or delta.load_state_dict(...) after materializing the model"
            )
        return DeltaStateError(
            f"delta {delta_name!r} on {type(module).__name__} is on {where} but the input is on "
            f"{x.device}; move the whole model with model.to(device) after attaching"
        )
    return err


def _refuse_meta(switch: Switch, module: nn.Module, x: Any, tensors: tuple) -> None:
    """torch computes garbage, without raising, from meta tensors next to real ones."""
    if tensors and tensors[0].is_meta and isinstance(x, torch.Tensor) and not x.is_meta:
        raise explain_failure(switch.name, module, x, tensors, None)


def in_dtype_of(tensors: tuple, reference: torch.Tensor) -> tuple:
    """The delta's floating tensors in the activations' dtype when they differ (a float32
    delta on a bfloat16 model, or under autocast): computed there, gradients flow back to
    the delta's own dtype."""
    if not tensors or not reference.is_floating_point() or tensors[0].dtype == reference.dtype:
        return tensors
    dtype = reference.dtype
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in tensors)


def _call(switch: Switch, module: nn.Module, x: Any, tensors: tuple, fn: Callable, *args):
    try:
        return fn(*args)
    except (RuntimeError, NotImplementedError) as err:
        explained = explain_failure(switch.name, module, x, tensors, err)
        if explained is err:
            raise
        raise explained from err


def rows_of(x: Any, index: torch.Tensor, batch: int, switch: Switch, module: nn.Module) -> Any:
    """The rows ``index`` of a module input that has one row per row of its output."""
    if not isinstance(x, torch.Tensor):
        return x
    if x.dim() == 0 or x.shape[0] != batch:
        raise UnsupportedModuleError(
            f"delta {switch.name!r} is routed per row, but {type(module).__name__} takes an "
            f"input of shape {list(x.shape)} for an output of {batch} rows; routing needs the "
            "batch as the first dimension of both: route a delta on other modules"
        )
    return x.index_select(0, index)


def _first_input(args: tuple, kwargs: dict) -> Any:
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)


class OutputHook:
    """The forward hook of an :class:`OutputSite` (registered ``with_kwargs``)."""

    __slots__ = ("entered", "fn", "hook_id", "in_place", "source", "switch")

    def __init__(self, site: OutputSite, switch: Switch, source: TensorSource) -> None:
        self.fn = site.fn
        self.in_place = site.in_place
        self.switch = switch
        self.source = source
        self.hook_id = -1
        self.entered = False  # the module was called (eager): deltahooks.liveness reads it

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict, output: Any):
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self.entered = True
            if not self.switch.active:
                return None
        tensors = self.source.gather(module)
        y = first_tensor(output)
        if y is None:
            raise UnsupportedModuleError(
                f"delta {self.switch.name!r} needs a tensor output, but {type(module).__name__} "
                f"returned {type(output).__name__}; target a submodule that returns a tensor"
            )
        x = _first_input(args, kwargs)
        _refuse_meta(self.switch, module, y, tensors)
        tensors = in_dtype_of(tensors, y)
        if self.switch.rows is not None:  # dh.route: only some rows of the batch
            index = self.switch.rows.index(y.shape[0], y.device, module)
            if index is not None:
                new = self._on_rows(module, x, y, tensors, index)
                return new if y is output else with_first(output, new)
        writable = (
            self.in_place
            and not compiling
            and y is output
            and next(iter(module._forward_hooks)) == self.hook_id
            and not _global_forward_hooks
            and y.is_contiguous()
        )
        new = _call(self.switch, module, x, tensors, self.fn, module, x, y, tensors, writable)
        if compiling:
            new = gated(self.switch, new, y)
        return new if y is output else with_first(output, new)

    def _on_rows(self, module: nn.Module, x: Any, y: torch.Tensor, tensors: tuple, index):
        """``y`` with ``fn`` applied to the rows in ``index`` only (the others as they are)."""
        x_rows = rows_of(x, index, y.shape[0], self.switch, module)
        y_rows = y.index_select(0, index)  # a new tensor: fn may write into it
        new = _call(
            self.switch, module, x, tensors, self.fn, module, x_rows, y_rows, tensors, self.in_place
        )
        return y.index_copy(0, index, new)


class InputHook:
    """The forward pre-hook of an :class:`InputSite` (registered ``with_kwargs``)."""

    __slots__ = ("entered", "fn", "source", "switch")

    def __init__(self, site: InputSite, switch: Switch, source: TensorSource) -> None:
        self.fn = site.fn
        self.switch = switch
        self.source = source
        self.entered = False  # as OutputHook.entered

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        compiling = torch.compiler.is_compiling()
        if not compiling:
            self.entered = True
            if not self.switch.active:
                return None
        tensors = self.source.gather(module)
        if args:
            first, rest = args[0], None
        else:
            key = next(iter(kwargs), None)
            if key is None:
                return None
            first = kwargs[key]
        x = first_tensor(first)
        if x is None:
            return None
        _refuse_meta(self.switch, module, x, tensors)
        tensors = in_dtype_of(tensors, x)
        index = None
        if self.switch.rows is not None:  # dh.route: only some rows of the batch
            index = self.switch.rows.index(x.shape[0], x.device, module)
        if index is not None:
            x_rows = x.index_select(0, index)
            new_rows = _call(self.switch, module, x, tensors, self.fn, module, x_rows, tensors)
            new_x = x.index_copy(0, index, new_rows)
        else:
            new_x = _call(self.switch, module, x, tensors, self.fn, module, x, tensors)
        if compiling:
            new_x = gated(self.switch, new_x, x)
        new = with_first(first, new_x)
        if args:
            rest = args[1:]
            return (new, *rest), kwargs
        return args, {**kwargs, key: new}


class RootCallHook:
    """The pre-hook of a :class:`RootCallSite` (registered ``with_kwargs``).

    ``owner`` is the part's target, which holds the part's own tensors: the hooked
    module may be another one (the root, for a part on a submodule).
    """

    __slots__ = ("entered", "fn", "owner", "source", "switch")

    def __init__(
        self, site: RootCallSite, switch: Switch, source: TensorSource, owner: nn.Module
    ) -> None:
        self.fn = site.fn
        self.switch = switch
        self.source = source
        self.owner = owner
        self.entered = False  # as OutputHook.entered

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        if not torch.compiler.is_compiling():
            self.entered = True
        if not self.switch.active:
            return None
        tensors = self.source.gather(self.owner)
        x = first_tensor(_first_input(args, kwargs))
        _refuse_meta(self.switch, module, x, tensors)
        return _call(
            self.switch, module, x, tensors, self.fn, module, tuple(args), dict(kwargs), tensors
        )


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
        _refuse_meta(self.switch, self.owner, weight, tensors)
        tensors = in_dtype_of(tensors, weight)
        new = _call(self.switch, self.owner, weight, tensors, self.fn, weight, tensors)
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
            _refuse_meta(self.switch, module, args[0], (copy,))


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
    shadows = module.__dict__
    if active:
        for attr, reserved, is_parameter in pairs:
            store = module._parameters if is_parameter else module._buffers
            shadows[attr] = store[reserved]
    else:
        for attr, _, _ in pairs:
            shadows.pop(attr, None)


def _redirect_pairs(site: RedirectSite, entries: dict) -> dict[str, list[tuple[str, str, bool]]]:
    owners: dict[str, list[tuple[str, str, bool]]] = {}
    for owner, local in site.keys:
        entry = entries[(owner, local)]
        owners.setdefault(owner, []).append((local, entry.reserved, entry.is_parameter))
    return owners


def sync_redirect(ledger: Ledger, site: RedirectSite, entries: list, active: bool) -> None:
    """Set or clear the redirects now, for code that reads attributes outside a forward."""
    by_key = {(entry.path, entry.local): entry for entry in entries}
    for owner, pairs in _redirect_pairs(site, by_key).items():
        apply_redirect(ledger.module(owner), active, pairs)


def install_site(ledger: Ledger, path: str, site: Site, switch: Switch, source) -> list:
    """Register one site through the ledger; returns the ledger entries that undo it.

    ``source`` is the :class:`TensorSource` of the site's tensors, or for a
    :class:`RedirectSite` the part's tensor entries by ``(owner, local)``.
    """
    if isinstance(site, OutputSite):
        hook = OutputHook(site, switch, source)
        entry = ledger.forward_hook(path, hook, with_kwargs=True, prepend=site.prepend)
        hook.hook_id = entry.handle.id
        return [entry]
    if isinstance(site, InputSite):
        hook = InputHook(site, switch, source)
        return [ledger.forward_pre_hook(path, hook, with_kwargs=True)]
    if isinstance(site, RootCallSite):
        hook = RootCallHook(site, switch, source, ledger.module(path))
        return [ledger.forward_pre_hook(site.module, hook, with_kwargs=True)]
    if isinstance(site, WeightSite):
        memo = CallMemo() if site.once_per_call else None
        function = WeightFunction(site, switch, source, ledger.module(path), memo)
        installed = [ledger.parametrize(path, site.attr, function)]
        if memo is not None:
            installed.append(ledger.forward_pre_hook(path, memo.open))
            installed.append(ledger.forward_hook(path, memo.close, always_call=True))
        return installed
    if isinstance(site, FlagSite):
        flag = ActiveFlag(switch)
        return [ledger.attribute(module, site.attr, flag) for module in site.modules]
    if isinstance(site, RedirectSite):
        installed = []
        for owner, pairs in _redirect_pairs(site, source).items():
            for attr, reserved, is_parameter in pairs:
                store = (
                    ledger.module(owner)._parameters
                    if is_parameter
                    else ledger.module(owner)._buffers
                )
                installed.append(ledger.shadow(owner, attr, store[reserved]))
            installed.append(ledger.forward_pre_hook(owner, RedirectHook(switch, pairs)))
        return installed
    raise TypeError(f"unknown site {site!r}; use one of the site classes in deltahooks.sites")
