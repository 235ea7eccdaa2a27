"""The contract between a method and the shared machinery.

A method is two small things: a *spec* (a frozen dataclass of hyperparameters that
says where it goes and validates itself) and *parts* (what it installs on one target
module, and how it merges). Installation, files, freezing and detach are shared.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .errors import DeltaStateError, SpecError
from .ledger import Ledger
from .merging import Merged, swap_out
from .targets import Target, describe

METHODS: dict[str, type[DeltaSpec]] = {}
DeviceLike = torch.device | str | None


def register_method(cls: type[DeltaSpec]) -> type[DeltaSpec]:
    """Class decorator: make a spec class loadable from files by its ``method`` name."""
    METHODS[cls.method] = cls
    return cls


@dataclass(frozen=True, kw_only=True)
class DeltaSpec:
    """Base of every method's hyperparameters; ``targets`` uses :mod:`deltahooks.targets`."""

    method: ClassVar[str] = ""
    targets: Target
    exclude: Target | None = None

    def __post_init__(self) -> None:
        if self.targets is None or (isinstance(self.targets, (list, tuple)) and not self.targets):
            raise SpecError(f"{type(self).__name__}: targets is empty; name at least one module")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`SpecError` for invalid hyperparameters."""

    def check_module(self, path: str, module: nn.Module) -> None:
        """Raise :class:`UnsupportedModuleError` when ``module`` cannot take this method."""

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        """Build (without installing) the delta for one target module.

        ``device=None`` builds the tensors next to the module's own; ``device="meta"``
        builds shapes only (no memory, no initialisation), which the loader uses to check
        a file's claims before it allocates anything.
        """
        raise NotImplementedError

    def hyperparameters(self) -> dict[str, Any]:
        """Everything but targets, JSON-ready, for files and summaries."""
        return {
            f.name: getattr(self, f.name)
            for f in dataclasses.fields(self)
            if f.name not in ("targets", "exclude")
        }

    def describe(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "hyperparameters": self.hyperparameters(),
            "targets": describe(self.targets),
            "exclude": None if self.exclude is None else describe(self.exclude),
        }


class Part:
    """What one spec puts on one target module.

    ``merge_order``: parts that replace a tensor (0) merge before parts that add to it
    (1), so a Full copy and a LoRA update on one layer merge to copy + update.

    ``tensors`` maps ``(owner path, local name)`` to ``(initial value, is_parameter)``,
    values on the target's device and dtype; :meth:`install` registers them and the hooks through
    the ledger. Hooks must look tensors up on the module at call time.
    """

    merge_order = 1

    def __init__(self, path: str, tensors: dict[tuple[str, str], Any]) -> None:
        self.path = path
        self.tensors = tensors
        self.entries: list = []  # the ledger TensorEntry objects holding this part's state
        self.spec_index = 0  # which spec of its Delta made it
        self.merges: list[Merged] = []  # what merge() swapped in, for unmerge()
        self.hooks: list = []  # the ledger HookEntry objects of install_hooks()

    def register_tensors(self, ledger: Ledger) -> None:
        for (owner, local), (value, is_parameter) in self.tensors.items():
            self.entries.append(ledger.add_tensor(owner, local, value, parameter=is_parameter))
        for owner in dict.fromkeys(owner for owner, _ in self.tensors):
            ledger.forgive_missing_delta_keys(owner)
        self.tensors = {}

    def install(self, ledger: Ledger, switch: Switch) -> None:
        """Register the tensors once, then the hooks (which merging takes away again)."""
        self.register_tensors(ledger)
        self.install_hooks(ledger, switch)

    def install_hooks(self, ledger: Ledger, switch: Switch) -> None:
        """Register this part's hooks through the ledger, appending them to ``self.hooks``."""
        raise NotImplementedError

    def remove_hooks(self, ledger: Ledger) -> None:
        """Drop this part's hooks: a merged delta computes through the weights alone."""
        while self.hooks:
            ledger.remove(self.hooks.pop())

    def merge(self, ledger: Ledger) -> None:
        raise NotImplementedError

    def unmerge(self, ledger: Ledger) -> None:
        """Restore every tensor :meth:`merge` swapped, newest first."""
        while self.merges:
            swap_out(ledger, self.merges.pop())

    def sync(self, ledger: Ledger, switch: Switch) -> None:
        """Called after enable/disable/merge; most parts read the switch in hooks instead."""


class MergedGuard:
    """The one hook a merged delta keeps, on its root: training it would change nothing.

    The per-layer hooks are removed while merged (so a merged forward costs what the base
    costs); this single pre-hook still refuses a training forward.
    """

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


class Switch:
    """State every hook of one delta reads on each call: flipping it adds no hooks."""

    __slots__ = ("active", "enabled", "merged", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self.enabled = True
        self.merged = False
        self.active = True

    def update(self) -> None:
        self.active = self.enabled and not self.merged

    def __getstate__(self):
        return (self.name, self.enabled, self.merged, self.active)

    def __setstate__(self, state) -> None:
        self.name, self.enabled, self.merged, self.active = state


def explain_failure(
    delta_name: str, module: nn.Module, x: Any, tensors: tuple, err: Exception | None
) -> Exception:
    """Turn a failure inside a hook into an error that says what to fix, when we can tell.

    Only called after an exception, so the hot path pays nothing for it.
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
    return err if err is not None else DeltaStateError(f"delta {delta_name!r} cannot run here")


def is_number(value: object) -> bool:
    """A real int or float (``True`` is an int to Python, never a hyperparameter here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def is_count(value: object) -> bool:
    """A positive int that is not a bool."""
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def check_probability(name: str, value: float) -> None:
    if not is_number(value) or not (0.0 <= value < 1.0):
        raise SpecError(f"{name}={value!r} must be a number in [0, 1); use 0 to switch it off")


def check_flag(name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"{name}={value!r} must be True or False")
