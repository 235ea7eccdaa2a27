"""The only place that changes a model: every hook, tensor and shadow a delta adds is
recorded here, so that detach removes exactly what was added and nothing else.

Entries name modules by their path from the delta's root, never by a captured module
object, so a deep-copied model's ledger undoes on the copy, and code that swaps a
module's parameters (FSDP2, ``model.to``) does not leave the ledger pointing at stale
tensors. Hooks registered by others (accelerate, FSDP, user code) are never removed or
changed; a delta's forward hook only goes in front of those already on its module (see
:meth:`Ledger.forward_hook`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.hooks import RemovableHandle

from . import reparametrize
from .errors import DeltaStateError, UnsupportedModuleError

RESERVED_PREFIX = "dh__"
"""Every tensor a delta registers on a module has a local name starting with this."""


def reserved_name(delta_name: str, local: str) -> str:
    """The module-level name of a delta tensor, e.g. ``dh__default__lora_A``.

    A dotted local name (``gate_up_proj.lora_A``: a tensor that belongs to one parameter
    of the module) is registered with ``__`` for the dots, which torch forbids in names.
    """
    return f"{RESERVED_PREFIX}{delta_name}__{local.replace('.', '__')}"


def is_reserved(name: str) -> bool:
    """True when a (possibly dotted) tensor name belongs to a delta."""
    return name.rsplit(".", 1)[-1].startswith(RESERVED_PREFIX)


def join(path: str, local: str) -> str:
    """Dotted path join where either side may be empty (the root)."""
    return f"{path}.{local}" if path and local else path or local


def _drop_missing_delta_keys(module: nn.Module, incompatible) -> None:
    incompatible.missing_keys[:] = [k for k in incompatible.missing_keys if not is_reserved(k)]


@dataclass
class TensorEntry:
    """A parameter or buffer registered on the module at ``path`` under ``reserved``."""

    path: str
    local: str
    reserved: str
    is_parameter: bool
    saved: bool  # part of the delta's state_dict and file

    @property
    def key(self) -> str:
        return join(self.path, self.local)


@dataclass
class HookEntry:
    path: str
    handle: RemovableHandle
    hook: object = None  # the hook itself, for code that reads what it recorded


def _is_ours(hook) -> bool:
    """True for a hook object that deltahooks made (a bound method counts by its object)."""
    owner = getattr(hook, "__self__", hook)
    return type(owner).__module__.partition(".")[0] == __name__.partition(".")[0]


def _move_ahead_of_foreign_hooks(hooks: dict, hook_id: int) -> None:
    """Move every foreign hook that runs before ``hook_id`` behind it, keeping their order."""
    ahead = list(hooks)[: list(hooks).index(hook_id)]
    for key in ahead:
        if not _is_ours(hooks[key]):
            hooks.move_to_end(key)


@dataclass
class ParametrizationEntry:
    """A ``torch.nn.utils.parametrize`` function on ``<path>.<attr>`` (see reparametrize)."""

    path: str
    attr: str
    function: nn.Module


@dataclass
class ShadowEntry:
    """An instance-``__dict__`` entry that makes ``module.<attr>`` resolve to another tensor."""

    path: str
    attr: str


@dataclass
class AttributeEntry:
    """An instance attribute set on a module; ``old`` is what its ``__dict__`` held, if any."""

    path: str
    attr: str
    had: bool
    old: object = None


class Ledger:
    """Registers delta state on a model and undoes it exactly, in reverse order.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from deltahooks.ledger import Ledger
        >>> model = nn.Sequential(nn.Linear(2, 2))
        >>> ledger = Ledger(model, "default")
        >>> _ = ledger.add_tensor("0", "scale", torch.ones(2))
        >>> ledger.undo()
        >>> list(model.state_dict())
        ['0.weight', '0.bias']
    """

    def __init__(self, root: nn.Module, delta_name: str) -> None:
        self.root = root
        self.delta_name = delta_name
        self.entries: list = []

    def module(self, path: str) -> nn.Module:
        return self.root.get_submodule(path) if path else self.root

    def add_tensor(
        self,
        path: str,
        local: str,
        tensor: torch.Tensor,
        *,
        parameter: bool = True,
        saved: bool = True,
        requires_grad: bool = True,
    ) -> TensorEntry:
        """Register ``tensor`` on the module at ``path`` under a reserved name."""
        module = self.module(path)
        name = reserved_name(self.delta_name, local)
        if name in module._parameters or name in module._buffers or hasattr(module, name):
            raise DeltaStateError(
                f"module {path or '<root>'!r} already has {name!r}: a delta named "
                f"{self.delta_name!r} is attached there already; detach it or choose another name"
            )
        if parameter:
            module.register_parameter(name, nn.Parameter(tensor, requires_grad=requires_grad))
        else:
            module.register_buffer(name, tensor, persistent=saved)
        entry = TensorEntry(path, local, name, parameter, saved)
        self.entries.append(entry)
        return entry

    def tensor(self, entry: TensorEntry) -> torch.Tensor:
        """The live tensor of an entry, looked up now (never a captured reference)."""
        module = self.module(entry.path)
        store = module._parameters if entry.is_parameter else module._buffers
        return store[entry.reserved]

    def forward_hook(self, path: str, hook, **options) -> HookEntry:
        """Register ``hook`` after the deltas' hooks on the module but before any other's.

        A delta is part of the module it acts on, so every hook that someone else put on
        the module sees the delta's output, including hooks registered before the attach:
        transformers installs hidden-state recorders on a model's first forward, and a
        delta attached after it would otherwise act too late for what they record.
        ``prepend=True`` goes in front of every hook, the deltas' own included.
        """
        module = self.module(path)
        handle = module.register_forward_hook(hook, **options)
        if not options.get("prepend", False):
            _move_ahead_of_foreign_hooks(module._forward_hooks, handle.id)
        entry = HookEntry(path, handle, hook)
        self.entries.append(entry)
        return entry

    def forward_pre_hook(self, path: str, hook, **options) -> HookEntry:
        handle = self.module(path).register_forward_pre_hook(hook, **options)
        entry = HookEntry(path, handle, hook)
        self.entries.append(entry)
        return entry

    def forgive_missing_delta_keys(self, path: str) -> HookEntry:
        """Let ``load_state_dict(strict=True)`` of a base checkpoint pass while attached.

        A base checkpoint lacks the delta's tensors; that is expected, so they are removed
        from the missing keys. Every other mismatch is still reported.
        """
        handle = self.module(path).register_load_state_dict_post_hook(_drop_missing_delta_keys)
        entry = HookEntry(path, handle)
        self.entries.append(entry)
        return entry

    def parametrize(self, path: str, attr: str, function: nn.Module) -> ParametrizationEntry:
        """Make ``module.<attr>`` read as ``function(original)``; base keys stay as they were."""
        module = self.module(path)
        if attr in module.__dict__:
            raise DeltaStateError(
                f"{join(path, attr)!r} is redirected to a Full copy by another delta, so a "
                "parametrization would not be seen; detach that delta first"
            )
        if attr not in module._parameters and attr not in module._buffers:
            if not parametrize.is_parametrized(module, attr):
                raise DeltaStateError(f"{join(path, attr)!r} is not a tensor of that module")
        reparametrize.add(module, attr, function)
        entry = ParametrizationEntry(path, attr, function)
        self.entries.append(entry)
        return entry

    def shadow(self, path: str, attr: str, value: torch.Tensor) -> ShadowEntry:
        """Make ``module.attr`` return ``value`` without touching ``module._parameters``."""
        module = self.module(path)
        theirs = reparametrize.foreign(module, attr)
        if theirs:
            names = ", ".join(type(f).__name__ for f in theirs)
            raise UnsupportedModuleError(
                f"{join(path, attr)!r} is computed by the model's own parametrization ({names}; "
                "e.g. torch's weight_norm or spectral_norm), which a replacement tensor cannot "
                "stand in for; choose a method or init that keeps the weight (LoRA's default "
                "init, not pissa/olora), exclude this module, or remove that parametrization "
                "before attaching"
            )
        if parametrize.is_parametrized(module, attr):
            raise DeltaStateError(
                f"{join(path, attr)!r} is parametrized (by another delta or by your model), "
                "so a Full copy would not be seen; detach that delta first"
            )
        if attr in module.__dict__:
            raise DeltaStateError(
                f"{join(path, attr)!r} is already redirected by another delta; "
                "detach that delta first"
            )
        module.__dict__[attr] = value
        entry = ShadowEntry(path, attr)
        self.entries.append(entry)
        return entry

    def attribute(self, path: str, attr: str, value: object) -> AttributeEntry:
        """Set ``module.<attr> = value`` on the instance; undo puts back what was there.

        For switches that library code reads from a module (a class attribute shadowed on
        this instance only), never for tensors (see :meth:`shadow`).
        """
        module = self.module(path)
        had = attr in module.__dict__
        entry = AttributeEntry(path, attr, had, module.__dict__.get(attr))
        object.__setattr__(module, attr, value)
        self.entries.append(entry)
        return entry

    def remove(self, entry) -> None:
        """Undo one entry now (e.g. a temporary buffer dropped on unmerge)."""
        self._undo(entry)
        self.entries.remove(entry)

    def undo(self) -> None:
        """Remove everything this ledger added, newest first."""
        while self.entries:
            self._undo(self.entries.pop())

    def _undo(self, entry) -> None:
        if isinstance(entry, HookEntry):
            entry.handle.remove()
            return
        module = self.module(entry.path)
        if isinstance(entry, ParametrizationEntry):
            reparametrize.remove(module, entry.attr, entry.function)
        elif isinstance(entry, ShadowEntry):
            module.__dict__.pop(entry.attr, None)
        elif isinstance(entry, AttributeEntry):
            if entry.had:
                module.__dict__[entry.attr] = entry.old
            else:
                module.__dict__.pop(entry.attr, None)
        elif entry.is_parameter:
            module._parameters.pop(entry.reserved, None)
        else:
            module._buffers.pop(entry.reserved, None)
            module._non_persistent_buffers_set.discard(entry.reserved)
