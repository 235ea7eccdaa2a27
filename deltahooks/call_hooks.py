"""The hooks that run call sites: an output, an input or a root-call site on a module.

Each is a small callable object registered through the ledger (:mod:`deltahooks.ledger`)
with kwargs. It returns at once while its delta is off, does the runner's chores
(:mod:`deltahooks.runner`) around the site's function, and records in ``entered`` that
its module was called, which :mod:`deltahooks.liveness` reads to warn about dead sites.
Under ``torch.compile`` it selects with the switch's gate instead of branching.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import _global_forward_hooks

from .errors import UnsupportedModuleError
from .runner import (
    TensorSource,
    call_explained,
    first_input,
    in_dtype_of,
    refuse_meta,
    rows_of,
    with_first,
)
from .sites import InputSite, OutputSite, RootCallSite, first_tensor
from .switch import Switch, gated


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
        x = first_input(args, kwargs)
        refuse_meta(self.switch, module, y, tensors)
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
        new = call_explained(
            self.switch, module, x, tensors, self.fn, module, x, y, tensors, writable
        )
        if compiling:
            new = gated(self.switch, new, y)
        return new if y is output else with_first(output, new)

    def _on_rows(self, module: nn.Module, x: Any, y: torch.Tensor, tensors: tuple, index):
        """``y`` with ``fn`` applied to the rows in ``index`` only (the others as they are)."""
        x_rows = rows_of(x, index, y.shape[0], self.switch, module)
        y_rows = y.index_select(0, index)  # a new tensor: fn may write into it
        new = call_explained(
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
        refuse_meta(self.switch, module, x, tensors)
        tensors = in_dtype_of(tensors, x)
        index = None
        if self.switch.rows is not None:  # dh.route: only some rows of the batch
            index = self.switch.rows.index(x.shape[0], x.device, module)
        if index is not None:
            x_rows = x.index_select(0, index)
            new_rows = call_explained(
                self.switch, module, x, tensors, self.fn, module, x_rows, tensors
            )
            new_x = x.index_copy(0, index, new_rows)
        else:
            new_x = call_explained(self.switch, module, x, tensors, self.fn, module, x, tensors)
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
        x = first_tensor(first_input(args, kwargs))
        refuse_meta(self.switch, module, x, tensors)
        return call_explained(
            self.switch, module, x, tensors, self.fn, module, tuple(args), dict(kwargs), tensors
        )
