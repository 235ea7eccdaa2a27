"""Full: train every parameter of whole modules (a new task head, say) on copies.

PEFT calls this ``modules_to_save``, OpenDelta ``unfrozen_modules``. The delta keeps
trainable copies of the target's parameters and persistent buffers, registered next to
the originals under reserved names; a redirect site makes ``module.weight`` resolve to
the copy, so the module's own forward uses it with no hook arithmetic, while
``state_dict()`` and ``detach`` still see the untouched originals.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..errors import DeltaStateError, UnsupportedModuleError
from ..ledger import is_reserved, join
from ..registry import registry_of
from ..sites import RedirectSite
from ..spec import DeltaSpec, DeviceLike, Part, register_method


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


def copies(module: nn.Module, tensors) -> dict[str, torch.Tensor]:
    """Merging a Full delta puts the trained copies in place of the originals."""
    return {key: value.detach().clone() for key, value in tensors.items()}


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
        if any(parametrize.is_parametrized(sub) for sub in module.modules()):
            raise UnsupportedModuleError(
                f"Full cannot copy {path or '<root>'!r}: it holds parametrized tensors "
                "(torch.nn.utils.parametrize: the model's own, e.g. weight_norm, or another "
                "delta's weight site), whose attributes a copy cannot stand in for; detach that "
                "delta, remove the model's parametrization first, or target another module"
            )
        if next(iter(_owned(module)), None) is None:
            raise UnsupportedModuleError(
                f"Full has nothing to train in {path or '<root>'!r} ({type(module).__name__}): "
                "it holds no parameters or persistent buffers; target a module that does"
            )

    def make_part(
        self, path: str, module: nn.Module, root: nn.Module, *, device: DeviceLike = None
    ) -> Part:
        registry = registry_of(root)
        tensors = {}
        for sub, attr, tensor, is_parameter in _owned(module):
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
            tensors[(join(path, sub), attr)] = (copy, is_parameter)
        return Part(path, tensors, [RedirectSite(tuple(tensors))], merge=copies, merge_order=0)
