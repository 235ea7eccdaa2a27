"""Full: train every parameter of whole modules (a new task head, say) on copies.

PEFT calls this ``modules_to_save``, OpenDelta ``unfrozen_modules``. The delta keeps
trainable copies of the target's parameters and persistent buffers, registered next
to the originals under reserved names; an instance-``__dict__`` entry makes
``module.weight`` resolve to the copy, so the module's own forward uses it with no
hook arithmetic, while ``state_dict()`` and ``detach`` still see the untouched originals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import DeltaStateError, UnsupportedModuleError
from ..ledger import Ledger, is_reserved, join
from ..merging import swap_in
from ..registry import registry_of
from ..spec import DeltaSpec, DeviceLike, Part, Switch, explain_failure, register_method
from .lora import raise_if_training_merged


@register_method
@dataclass(frozen=True, kw_only=True)
class Full(DeltaSpec):
    """Train whole modules: every parameter (and persistent buffer) of each target.

    What PEFT calls ``modules_to_save`` (OpenDelta: ``unfrozen_modules``): typically a
    new task head, such as a classifier, trained in full next to a LoRA. The delta
    holds trainable copies of every parameter and persistent buffer of each target and
    its submodules (a BatchNorm's running statistics included); the module's forward
    uses the copies, ``delta.save()`` stores them (so the file is as large as those
    modules), and ``detach()`` gives back the untouched originals. ``delta.merge()``
    writes the copies into the module's own tensors, keeping the originals for
    ``unmerge()``. Full has no hyperparameters; its arguments are keyword-only.

    Args:
        targets: the modules to train in full, in the target syntax of
            :func:`deltahooks.attach` (name suffix such as ``"classifier"``, glob,
            ``"re:"`` regex, ``"all-linear"``, module class, callable, ``dh.Paths``, or a
            list of these). Required. PEFT: ``modules_to_save``. A module with no
            parameter or persistent buffer raises
            :class:`deltahooks.UnsupportedModuleError` at attach; a module another
            attached delta already trains in full raises
            :class:`deltahooks.DeltaStateError`.
        exclude: modules to leave out of ``targets``, same syntax. Default ``None``.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 2))
        >>> delta = dh.attach(model, dh.Full(targets=["1"]))
        >>> sorted(delta.state_dict())
        ['1.bias', '1.weight']
        >>> [name for name, p in model.named_parameters() if p.requires_grad]
        ['1.dh__default__weight', '1.dh__default__bias']
    """

    method = "full"

    def check_module(self, path: str, module: nn.Module) -> None:
        if next(iter(_owned(module)), None) is None:
            raise UnsupportedModuleError(
                f"Full has nothing to train in {path or '<root>'!r} ({type(module).__name__}): "
                "it holds no parameters or persistent buffers; target a module that does"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> FullPart:
        registry = registry_of(root)
        tensors = {}
        for sub, attr, tensor, is_param in _owned(module):
            key = join(join(path, sub), attr)
            if registry is not None and registry.merge_stacks.get(key):
                raise DeltaStateError(
                    f"cannot copy {key!r} for Full: delta {registry.merge_stacks[key][-1]!r} is "
                    "merged into it, and the copy must start from the original; unmerge it first"
                )
            if device is None:
                copy = tensor.detach().clone()
            else:
                copy = torch.empty_like(tensor, device=device)
            tensors[(join(path, sub), attr)] = (copy, is_param)
        return FullPart(path, tensors)


def _owned(module: nn.Module):
    """(submodule path, attribute, tensor, is_parameter) for everything a Full copy holds.

    Tensors of other deltas (reserved names) are not part of the module being copied.
    """
    for sub, owner in module.named_modules():
        for attr, param in owner._parameters.items():
            if param is not None and not is_reserved(attr):
                yield sub, attr, param, True
        for attr, buf in owner._buffers.items():
            persistent = attr not in owner._non_persistent_buffers_set
            if buf is not None and persistent and not is_reserved(attr):
                yield sub, attr, buf, False


class _Redirect:
    """Forward pre-hook on each owner: (re)points ``module.<attr>`` at the live copy.

    The shadow is set at attach already; re-reading it per call keeps it right when
    something (FSDP2, ``model.to``) replaced the registered copy with a new tensor.
    """

    __slots__ = ("pairs", "switch")

    def __init__(self, switch: Switch, pairs: list[tuple[str, str, bool]]):
        self.switch = switch
        self.pairs = pairs

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not self.switch.active:
            raise_if_training_merged(self.switch, module)
        apply_redirect(module, self.switch.active, self.pairs)
        if self.switch.active and args and isinstance(args[0], torch.Tensor):
            attr = self.pairs[0][0]
            copy = module.__dict__[attr]
            if copy.is_meta and not args[0].is_meta:  # torch would compute garbage
                raise explain_failure(self.switch.name, module, args[0], (copy,), None)


def apply_redirect(module: nn.Module, active: bool, pairs) -> None:
    shadows = module.__dict__
    if active:
        for attr, reserved, is_param in pairs:
            store = module._parameters if is_param else module._buffers
            shadows[attr] = store[reserved]
    else:
        for attr, _, _ in pairs:
            shadows.pop(attr, None)


class FullPart(Part):
    merge_order = 0  # replaces tensors: must merge before additive parts on them

    def __init__(self, path, tensors) -> None:
        super().__init__(path, tensors)
        self.owners: dict[str, list[tuple[str, str, bool]]] = {}

    def install(self, ledger: Ledger, switch: Switch) -> None:
        self.register_tensors(ledger)
        for entry in self.entries:
            self.owners.setdefault(entry.path, []).append(
                (entry.local, entry.reserved, entry.is_parameter)
            )
            ledger.shadow(entry.path, entry.local, ledger.tensor(entry))
        self.install_hooks(ledger, switch)

    def install_hooks(self, ledger: Ledger, switch: Switch) -> None:
        for owner, pairs in self.owners.items():
            self.hooks.append(ledger.forward_pre_hook(owner, _Redirect(switch, pairs)))

    def sync(self, ledger: Ledger, switch: Switch) -> None:
        for owner, pairs in self.owners.items():
            apply_redirect(ledger.module(owner), switch.active, pairs)

    @torch.no_grad()
    def merge(self, ledger: Ledger) -> None:
        for entry in self.entries:
            value = ledger.tensor(entry).detach().clone()
            ledger.module(entry.path).__dict__.pop(entry.local, None)  # our own shadow
            self.merges.append(swap_in(ledger, entry.path, entry.local, value))
