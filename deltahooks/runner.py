"""The runner: what every site's hook does around a method's function.

Each hook (:mod:`deltahooks.call_hooks`, :mod:`deltahooks.attribute_hooks`) does the same
chores before and after it calls the function a site declares (:mod:`deltahooks.sites`):
it looks the method's tensors up on the module *now* (never captured: FSDP2 and
``model.to`` replace them), refuses meta-device tensors next to real inputs, computes in
the activations' dtype, narrows a routed batch to its rows, and turns a failure into an
error that says what to fix. They live here once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .errors import DeltaStateError, UnsupportedModuleError
from .switch import Switch


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


def refuse_meta(switch: Switch, module: nn.Module, x: Any, tensors: tuple) -> None:
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


def call_explained(
    switch: Switch, module: nn.Module, x: Any, tensors: tuple, fn: Callable, *args
) -> Any:
    """``fn(*args)``, with a failure that :func:`explain_failure` can tell the cause of
    raised as that error instead."""
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


def first_input(args: tuple, kwargs: dict) -> Any:
    """A module call's first argument, positional or by keyword."""
    if args:
        return args[0]
    return next(iter(kwargs.values()), None)
