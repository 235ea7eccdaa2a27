"""Liveness: a delta that does nothing somewhere says so, once, instead of training silently.

Two checks per delta, each settled once, made from one forward hook on the model root:

- **Dead sites.** A site that acts through a hook (an output, input or call site) acts only
  when its module is *called*. Code that reads a child's weight itself
  (``F.linear(x, self.child.weight)``) or skips the child never calls it, so the hook never
  runs. Each site hook records that its module was entered (``entered``, see
  :mod:`deltahooks.sites`); after the first forward of the model root in which the delta
  was active, the modules not entered (before or during it) are named in one
  :class:`~deltahooks.errors.DeadSiteWarning`.
- **Tensors without a gradient.** In the first backward that runs through the output of a
  root forward in which the delta was active, every trainable delta tensor should receive a
  gradient. A callback at the end of that backward (queued from a hook on the output, so a
  nested backward such as reentrant checkpointing does not end it early) names those that
  received none in one :class:`~deltahooks.errors.NoGradientWarning`.

Once both are settled the root hook returns at once (it is not removed: a graph that
``torch.compile`` traced with it stays valid). It goes through the delta's ledger, so
detach removes it; hooks on the model's output tensors live and die with those tensors.
Under ``torch.compile`` and ``torch.func`` the checks wait for an eager call.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn

from .call_hooks import InputHook, OutputHook
from .distributed import _dtensor_class
from .errors import DeadSiteWarning, NoGradientWarning, warn
from .ledger import HookEntry, Ledger
from .switch import Switch

SHOWN = 3  # paths named in a warning before "and N more"


def listed(paths: list[str]) -> str:
    """``'a', 'b', 'c' and 4 more``: a few names and how many others."""
    names = ", ".join(repr(path or "<root>") for path in paths[:SHOWN])
    rest = len(paths) - SHOWN
    return f"{names} and {rest} more" if rest > 0 else names


# ------------------------------------------------------------------------- dead sites
def _acts_on(hook: object) -> str:
    if isinstance(hook, OutputHook):
        return "output"
    return "input" if isinstance(hook, InputHook) else "call"


def unentered(parts: Iterable, specs: tuple) -> list[tuple[str, str, str]]:
    """``(module path, method, what its hook acts on)`` of every hook-based site whose module
    has not been called yet (each site's hook records it in ``entered``; a hook on the root
    is left out: calling the model calls it)."""
    found = []
    for part in parts:
        method = type(specs[part.spec_index]).__name__
        for entry in part.installed:
            hook = getattr(entry, "hook", None)
            if entry.path and hasattr(hook, "entered") and not hook.entered:
                found.append((entry.path, method, _acts_on(hook)))
    return list(dict.fromkeys(found))


def has_hook_sites(parts: Iterable) -> bool:
    return any(
        entry.path and hasattr(getattr(entry, "hook", None), "entered")
        for part in parts
        for entry in part.installed
    )


def dead_site_message(name: str, root: nn.Module, dead: list[tuple[str, str, str]]) -> str:
    """The warning for modules a delta hooks that were never called; ``dead`` holds
    ``(path, method, acts on)``, grouped here by method, module class and what is acted on."""
    groups: dict[tuple[str, str, str], list[str]] = {}
    for path, method, acts_on in dead:
        kind = type(root.get_submodule(path)).__name__ if path else type(root).__name__
        groups.setdefault((method, kind, acts_on), []).append(path)
    described = "; ".join(
        f"{method} on the {acts_on} of {listed(paths)} ({kind}, {len(paths)} "
        f"module{'s' if len(paths) > 1 else ''})"
        for (method, kind, acts_on), paths in groups.items()
    )
    weighted = [path for path, _, _ in dead if "weight" in root.get_submodule(path)._parameters]
    example = f" (e.g. dh.LoRA(targets=[{weighted[0] + '.weight'!r}]))" if weighted else ""
    return (
        f"delta {name!r} acts through hooks on modules that the model's first forward never "
        f"called: {described}. Their parent reads their weights directly (e.g. "
        "F.linear(x, self.child.weight)) or skips them, so the delta does nothing there and "
        "its tensors there get no gradient. Target modules that are called, or use a method "
        f"that acts through the weight{example}. Modules called only for some inputs (MoE "
        "experts that no token was routed to, a branch taken in training only) are expected "
        "here: then ignore this warning"
    )


# ----------------------------------------------------------------- missing gradients
def output_tensors(output: Any) -> list[torch.Tensor]:
    """The top-level tensors of a model's output that a backward can start from."""
    if isinstance(output, torch.Tensor):
        items: Iterable = (output,)
    elif isinstance(output, Mapping):
        items = output.values()
    elif isinstance(output, (tuple, list)):
        items = output
    else:
        return []
    return [t for t in items if isinstance(t, torch.Tensor) and t.requires_grad]


def _is_functorch(tensor: torch.Tensor) -> bool:
    return torch._C._functorch.is_functorch_wrapped_tensor(tensor)


def _runs_grad_only(tensor: torch.Tensor) -> bool:
    """True inside ``torch.autograd.grad`` (no ``.grad`` is written: nothing to compare)."""
    node = torch.autograd.graph.get_gradient_edge(tensor).node
    try:
        torch._C._will_engine_execute_node(node)
    except RuntimeError:  # torch refuses the question for a leaf inside autograd.grad()
        return True
    return False


def no_gradient_message(name: str, missing: list[str], trainable: int) -> str:
    tensors = f"{trainable} trainable tensors of delta {name!r}"
    if len(missing) == trainable:
        head = f"none of the {tensors} received a gradient"
    else:
        head = f"{len(missing)} of the {tensors} received no gradient"
    return (
        f"{head} in the first backward through the model's output: "
        f"{listed(missing)}. The loss does not depend on them: their modules were not called "
        "(see DeadSiteWarning), or a layer between them and the output passes no gradient to "
        "its input (an op without a backward, a tensor detached or computed under no_grad, a "
        "quantized layer switched to an inference-only kernel). Tensors of modules unused for "
        "this batch (MoE experts no token reached) are expected here. Frozen tensors "
        "(requires_grad=False) and disabled, unrouted or merged deltas are not checked"
    )


class Watch:
    """The liveness checks of one delta: a forward hook on the model root, each check settled
    once (afterwards the hook returns at once; it stays, so a compiled graph that traced it
    stays valid).

    ``pause`` takes the hook away (a merged delta computes through the weights alone and
    keeps only its guard hook); ``resume`` puts it back.
    """

    def __init__(
        self, ledger: Ledger, switch: Switch, name: str, parts: list, specs: tuple, tensors: list
    ) -> None:
        self.ledger = ledger
        self.switch = switch
        self.name = name
        self.parts = parts
        self.specs = specs
        self.tensors = tensors  # ledger entries of the delta's parameters
        self.dead_pending = has_hook_sites(parts)
        self.grad_pending = bool(tensors)
        self.before: list | None = None  # (key, tensor, grad, grad version) when armed
        self.queued = False
        self.entry: HookEntry | None = None

    def resume(self) -> None:
        if self.entry is None:  # settled or not: unmerge gives back the hooks merge took
            self.entry = self.ledger.forward_hook("", self)

    def pause(self) -> None:
        if self.entry is not None:
            self.ledger.remove(self.entry)
            self.entry = None

    # ----------------------------------------------------------- root forward
    def __call__(self, root: nn.Module, args: tuple, output: Any) -> None:
        if torch.compiler.is_compiling() or not (self.dead_pending or self.grad_pending):
            return
        if not self.switch.active:
            return
        if self.dead_pending:
            self.dead_pending = False
            dead = unentered(self.parts, self.specs)
            if dead:
                warn(dead_site_message(self.name, root, dead), DeadSiteWarning)
        if self.grad_pending and torch.is_grad_enabled():
            self._arm(output)

    def _arm(self, output: Any) -> None:
        """Note the delta's gradients now, and hook the output to compare after backward."""
        starts = output_tensors(output)
        if not starts or any(_is_functorch(t) for t in starts):
            return
        tensors = [(entry.key, self.ledger.tensor(entry)) for entry in self.tensors]
        dtensor = _dtensor_class()
        if dtensor is not None and any(isinstance(t, dtensor) for _, t in tensors):
            self.grad_pending = False  # FSDP2 writes sharded gradients after the backward
            return
        self.before = [  # the tensors the call used (torch.func.functional_call swaps them)
            (key, tensor, tensor.grad, None if tensor.grad is None else tensor.grad._version)
            for key, tensor in tensors
            if tensor.requires_grad and tensor.is_leaf
        ]
        if not self.before:
            return
        for tensor in starts:
            tensor.register_hook(self._backward_started)

    def _backward_started(self, grad: torch.Tensor) -> None:
        if not self.grad_pending or self.queued or not self.before:
            return
        if _runs_grad_only(self.before[0][1]):
            return
        self.queued = True
        torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)

    def _backward_ended(self) -> None:
        self.queued = False
        if not self.grad_pending or not self.before:
            return  # settled meanwhile
        missing = [
            key
            for key, tensor, old, version in self.before
            if tensor.grad is None or (tensor.grad is old and tensor.grad._version == version)
        ]
        trainable = len(self.before)
        self.grad_pending = False
        self.before = None
        if missing:
            warn(no_gradient_message(self.name, missing, trainable), NoGradientWarning)

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["before"], state["queued"] = None, False  # gradients are not part of a copy
        return state


def watch(
    ledger: Ledger, switch: Switch, name: str, parts: list, specs: tuple, shared: list
) -> Watch:
    """Install both checks for a delta just attached (see the module docstring)."""
    entries = [entry for part in parts for entry in part.entries] + list(shared)
    parameters = [entry for entry in entries if entry.is_parameter]
    checks = Watch(ledger, switch, name, parts, specs, parameters)
    checks.resume()
    return checks
