"""Sites: where a method acts on a module — the declarations a method returns.

A method's :meth:`~deltahooks.spec.DeltaSpec.make_part` names its sites and supplies pure
functions; this module holds only what a method author needs for that. Running them is
shared machinery a method never touches: :mod:`deltahooks.runner` (the chores every hook
does), :mod:`deltahooks.call_hooks` and :mod:`deltahooks.attribute_hooks` (one hook per
kind of site), and :mod:`deltahooks.install` (putting a part's sites on a model).

- :class:`OutputSite` — forward hook: ``y ← fn(module, x, y, tensors, writable)``;
- :class:`InputSite` — forward pre-hook: ``x ← fn(module, x, tensors)``;
- :class:`WeightSite` — ``torch.nn.utils.parametrize``: ``W ← fn(W, tensors)``;
- :class:`RootCallSite` — pre-hook on the model root (or another module named by its path)
  that may rewrite the whole call: ``(args, kwargs) ← fn(module, args, kwargs, tensors)``;
- :class:`RedirectSite` — module attributes that read the part's own copies;
- :class:`FlagSite` — a module attribute that reads true while the delta is active (a
  switch library code checks, such as transformers' ``_can_checkpoint_with_cache``).

``fn`` is called only while the delta is active (compiled code selects its result
instead), with its tensors looked up on the module at call time. ``tensors`` is a tuple in
the order the site names them. Outputs that are tuples (decoder layers) or ``ModelOutput``-like mappings are acted
on through their first element, the hidden state (:func:`first_tensor`); the rest passes
through.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch


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


def first_tensor(value: Any) -> torch.Tensor | None:
    """The hidden state of a module's output or input: the tensor, or the first element.

    Example:
        >>> import torch
        >>> first_tensor((torch.zeros(2, 3), None)).shape  # a decoder layer's (hidden, cache)
        torch.Size([2, 3])
    """
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if isinstance(value, Mapping) and value:
        first = next(iter(value.values()))
        return first if isinstance(first, torch.Tensor) else None
    return None
