"""plan: everything an attach will install, resolved, checked and built before the model
is touched.

Both a fresh attach and ``dh.load`` (on the ``meta`` device, to compare shapes with a
file) start here, and ``Delta.reset_parameters`` plans again for fresh values; so the
plan stands below the Delta and the verbs that use it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import reparametrize
from .errors import SpecError
from .ledger import join
from .spec import (
    DeltaSpec,
    DeviceLike,
    Part,
    SharedTensor,
    check_quantized,
    refuse_quantized_merge,
)
from .targets import resolve_targets


@dataclass
class Plan:
    """Everything an attach will install, built before the model is touched."""

    parts: list[Part]
    shared: list[dict[str, SharedTensor]]  # per spec: shared tensors, stored on the root
    spec_of: list[int]  # beside ``parts``: the index of the spec that made each one

    def placed(self) -> list[tuple[int, Part]]:
        """``(spec index, part)`` for every part, in attach order."""
        return list(zip(self.spec_of, self.parts))

    def tensors(self) -> dict[str, torch.Tensor]:
        """``{delta state_dict key: planned tensor}`` (what a file of this plan holds)."""
        planned = {
            local: value.tensor
            for shared in self.shared
            for local, value in shared.items()
            if value.saved
        }
        for part in self.parts:
            for (owner, local), (value, _) in part.tensors.items():
                if (owner, local) not in part.unsaved:
                    planned[join(owner, local)] = value
        return planned

    def values(self) -> dict[tuple[str, str], torch.Tensor]:
        """Every planned tensor by ``(owner path, local name)``, the shared ones on the root
        (``""``): fresh starting values, as ``Delta.reset_parameters`` copies them in."""
        values = {}
        for shared in self.shared:
            values.update({("", local): item.tensor for local, item in shared.items()})
        for part in self.parts:
            values.update({key: value for key, (value, _) in part.tensors.items()})
        return values


def plan(model: nn.Module, specs: tuple[DeltaSpec, ...], *, device: DeviceLike = None) -> Plan:
    """Resolve, check and build every part without changing the model.

    ``device="meta"`` plans shapes only: nothing is allocated or initialised. The model's
    own parametrizations are read as in eval mode meanwhile (a ``spectral_norm`` would
    otherwise step its power iteration each time a method reads the weight).
    """
    with reparametrize.reads_without_side_effects(model):
        return _plan(model, specs, device)


def _plan(model: nn.Module, specs: tuple[DeltaSpec, ...], device: DeviceLike) -> Plan:
    parts: list[Part] = []
    shared: list[dict[str, SharedTensor]] = []
    spec_of: list[int] = []
    owner: dict[tuple[str, str], str] = {}

    def claim(key: tuple[str, str], who: str) -> None:
        if key in owner:
            raise SpecError(
                f"{key[0] or '<root>'!r} would get {key[1]!r} twice (from {owner[key]} and "
                f"{who}); targets of one delta must not overlap"
            )
        owner[key] = who

    for index, spec in enumerate(specs):
        resolved = resolve_targets(
            model, spec.targets, spec.exclude, parameters=spec.parameter_targets
        )
        for path, module in resolved:
            spec.check_module(path, module)
            check_quantized(spec, path, module)
        spec.check_targets(resolved)
        common = {
            local: SharedTensor.of(value)
            for local, value in spec.make_shared(model, resolved, device=device).items()
        }
        dtype = getattr(torch, spec.dtype) if spec.dtype else None
        if dtype is not None:
            common = {
                local: shared._replace(tensor=shared.tensor.to(dtype))
                if shared.tensor.is_floating_point()
                else shared
                for local, shared in common.items()
            }
        for local in common:
            claim(("", local), f"{spec.method}'s shared tensors")
        shared.append(common)
        for path, module in resolved:
            part = spec.make_part(path, module, model, device=device)
            refuse_quantized_merge(part, module)
            if dtype is not None:
                part.cast(dtype)
            for key in part.tensors:
                claim(key, f"{spec.method} on {path!r}")
            parts.append(part)
            spec_of.append(index)
    return Plan(parts, shared, spec_of)
