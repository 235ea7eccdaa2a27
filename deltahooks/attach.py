"""attach / detach / deltas: the verbs users call.

Attach is all-or-nothing: every target is resolved, checked and built before the
model is touched, and if installing fails halfway the ledger undoes what was done.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from .delta import Delta
from .errors import DeltaStateError, SpecError
from .ledger import Ledger
from .registry import close_registry_if_empty, open_registry, registries_under
from .spec import DeltaSpec, DeviceLike, Part, Switch
from .targets import resolve_targets

DEFAULT_NAME = "default"
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


def _as_specs(spec: DeltaSpec | Sequence[DeltaSpec]) -> tuple[DeltaSpec, ...]:
    if isinstance(spec, DeltaSpec) or _is_spec_class(spec):
        specs = (spec,)
    elif isinstance(spec, (list, tuple)):
        specs = tuple(spec)
    else:
        raise SpecError(
            f"attach expects a deltahooks spec or a list of them, e.g. dh.LoRA(targets=['q_proj']), "
            f"got {type(spec).__name__}"
        )
    if not specs:
        raise SpecError("attach got an empty spec list; pass e.g. dh.LoRA(targets=['q_proj'])")
    for item in specs:
        if _is_spec_class(item):
            raise SpecError(
                f"attach got the class dh.{item.__name__}, not a spec: call it with its "
                f"hyperparameters, e.g. dh.{item.__name__}(targets=['q_proj'])"
            )
        if not isinstance(item, DeltaSpec):
            raise SpecError(
                f"attach expects deltahooks specs such as dh.LoRA(...), got {type(item).__name__}"
            )
    return specs


def _is_spec_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, DeltaSpec)


def plan_parts(
    model: nn.Module, specs: tuple[DeltaSpec, ...], *, device: DeviceLike = None
) -> list[Part]:
    """Resolve, check and build every part without changing the model.

    ``device="meta"`` plans shapes only: nothing is allocated or initialised.
    """
    parts: list[Part] = []
    owner: dict[tuple[str, str], str] = {}
    for index, spec in enumerate(specs):
        resolved = resolve_targets(model, spec.targets, spec.exclude)
        for path, module in resolved:
            spec.check_module(path, module)
        for path, module in resolved:
            part = spec.make_part(path, module, model, device=device)
            part.spec_index = index
            for key in part.tensors:
                if key in owner:
                    raise SpecError(
                        f"{key[0] or '<root>'!r} would get {key[1]!r} twice (from {owner[key]} "
                        f"and {spec.method} on {path!r}); targets of one delta must not overlap"
                    )
                owner[key] = f"{spec.method} on {path!r}"
            parts.append(part)
    return parts


def attach(
    model: nn.Module,
    spec: DeltaSpec | Sequence[DeltaSpec],
    name: str | None = None,
    *,
    freeze_base: bool = True,
) -> Delta:
    """Attach a delta to ``model`` through hooks; returns the :class:`Delta`.

    ``spec`` is one method spec or a list of them (one Delta, several parts). With
    ``freeze_base`` (default) every base parameter gets ``requires_grad=False`` until
    the last such delta is detached, which restores each original flag.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> delta = dh.attach(model, [dh.LoRA(targets=["0"], r=2), dh.Full(targets=["1"])])
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['0.dh__default__lora_A', '0.dh__default__lora_B', '1.dh__default__weight', '1.dh__default__bias']
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach needs an nn.Module, got {type(model).__name__}")
    specs = _as_specs(spec)
    name = DEFAULT_NAME if name is None else name
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SpecError(
            f"delta name {name!r} must be an identifier (letters, digits, '_'), e.g. 'task_a'"
        )
    for _, _, registry in registries_under(model):
        if name in registry.deltas:
            raise DeltaStateError(
                f"a delta named {name!r} is already attached to this model; pass another "
                f"name=..., or detach it first (attached: {sorted(registry.deltas)})"
            )
    parts = plan_parts(model, specs)

    registry = open_registry(model)
    ledger = Ledger(model, name)
    switch = Switch(name)
    delta = None
    try:
        for part in parts:
            part.install(ledger, switch)
        delta = Delta(model, name, specs, parts, ledger, switch, freeze_base)
        registry.deltas[name] = delta
        if freeze_base:
            registry.freeze_base(model, name)
    except BaseException:
        ledger.undo()
        registry.deltas.pop(name, None)
        if freeze_base:
            registry.release(name)
        close_registry_if_empty(model)
        raise
    return delta


def attach_with_state(
    model: nn.Module,
    specs: Sequence[DeltaSpec],
    state: dict,
    *,
    name: str | None,
    freeze_base: bool,
) -> Delta:
    """:func:`attach`, then copy ``state`` in; if that fails the delta is detached again."""
    delta = attach(model, specs, name=name, freeze_base=freeze_base)
    try:
        delta.load_state_dict(state)
    except BaseException:
        delta.detach()
        raise
    return delta


def deltas(model: nn.Module) -> dict[str, Delta]:
    """The deltas attached to ``model`` (or to a submodule of it), by name.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
        >>> _ = dh.attach(model, dh.LoRA(targets=torch.nn.Linear))
        >>> dh.deltas(model)
        {'default': Delta(name='default', parts=[lora×2], enabled=True, merged=False)}
    """
    found: dict[str, Delta] = {}
    for _, _, registry in registries_under(model):
        found.update(registry.deltas)
    return found


def detach(model: nn.Module) -> None:
    """Detach every delta on ``model``, newest first; the model is then as before attach.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> _ = dh.attach(model, dh.LoRA(targets=["0"]), name="a")
        >>> _ = dh.attach(model, dh.LoRA(targets=["0"]), name="b")
        >>> dh.detach(model)
        >>> dh.deltas(model), list(model.state_dict())
        ({}, ['0.weight', '0.bias'])
    """
    attached = list(deltas(model).values())
    while any(delta.merged for delta in attached):  # unmerge newest merges first
        for delta in attached:
            if delta.merged:
                try:
                    delta.unmerge()
                except DeltaStateError:
                    continue  # another delta merged on top of it: unmerged in a later pass
    for delta in reversed(attached):
        delta.detach()
