"""attach / detach / deltas: the verbs users call.

Attach is all-or-nothing: every target is resolved, checked and built before the
model is touched, and if installing fails halfway the ledger undoes what was done.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from torch import nn

from . import liveness
from .delta import Delta, teardown
from .errors import DeltaStateError, SpecError
from .install import install_plan
from .ledger import Ledger
from .planning import plan
from .quantized_training import keep_trainable_layout
from .registry import ModelRegistry, admit, refuse_nested_roots, registries_under
from .spec import DeltaSpec
from .switch import Switch

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


def _refuse_layers_with_merged_scales(
    found: Sequence[tuple[str, nn.Module, ModelRegistry]], paths: set[str]
) -> None:
    """A merged scale (IA3) is part of its layer's weights; a new delta there would see the
    scaled weights instead of scaled inputs/outputs, and unmerging would then change it.

    ``found`` are the registries on the model, as attach read them.
    """
    for _, _, registry in found:
        for other in registry.deltas.values():
            if not other.merged:
                continue
            for part in other._parts:
                if part.exclusive_merge and part.path in paths:
                    raise DeltaStateError(
                        f"delta {other.name!r} is merged into {part.path or '<root>'!r} as a "
                        "scale of the layer; unmerge it before attaching another delta there "
                        f"(delta.unmerge()), or choose other targets"
                    )


def attach(
    model: nn.Module,
    spec: DeltaSpec | Sequence[DeltaSpec],
    name: str | None = None,
    *,
    freeze_base: bool = True,
) -> Delta:
    """Attach a delta to ``model`` through hooks; returns the :class:`Delta`.

    The base weights are not changed: each delta tensor is registered on the module it
    adapts (so it is in ``model.parameters()`` and moves with ``model.to()``), and
    ``delta.detach()`` gives back exactly the model you had. Attach is all-or-nothing:
    every target is resolved and checked first, and any error leaves the model as it
    was.

    Args:
        model: the model (any ``nn.Module``). Attach every delta of one model with the
            same root module.
        spec: a method spec such as ``dh.LoRA(targets=["q_proj", "v_proj"], r=8)``,
            ``dh.Adapter(...)`` or ``dh.Full(...)``, or a list of specs: one Delta with
            several parts, e.g. ``[dh.LoRA(targets="all-linear"),
            dh.Full(targets=["classifier"])]``. Two parts of one delta must not add the
            same tensor to one module.
        name: the delta's name, an identifier (letters, digits and ``_``, starting with
            a letter); default ``"default"``. Several deltas may sit on one model under
            different names (``dh.deltas(model)`` lists them); a name that is already
            attached is an error.
        freeze_base: when true (default), every base parameter gets
            ``requires_grad=False``, so an optimizer over ``model.parameters()`` trains
            only delta tensors; the original flags come back when the last freezing
            delta is detached, in whatever order they are detached. Pass ``False`` to
            keep training base parameters too.

    Targets: every spec's ``targets=`` (and ``exclude=``) takes any of these forms,
    matched against the paths of ``model.named_modules()``:

    - a name suffix on a ``.`` boundary: ``"q_proj"`` matches
      ``model.layers.3.self_attn.q_proj``; a full path matches itself;
    - a glob (contains ``*``, ``?`` or ``[``), also suffix-anchored:
      ``"layers.*.mlp.*"`` matches ``model.layers.0.mlp.up_proj``;
    - a regex after ``"re:"``, which must match the whole path:
      ``"re:.*(q|v)_proj"``;
    - ``"all-linear"``: every ``nn.Linear`` and GPT-2 ``Conv1D`` except the output head
      (``model.get_output_embeddings()`` when the model has it, else the last linear
      layer);
    - a module class, matched with ``isinstance``: ``torch.nn.Linear``;
    - a module object, or a list of module objects: exactly those modules, e.g.
      ``model.classifier`` or ``[model.layers[0].mlp, model.layers[1].mlp]``;
    - a callable ``(path, module) -> bool``:
      ``lambda path, module: path.startswith("encoder.")``;
    - ``dh.Paths([...])``: exact module paths, with no suffix or pattern logic;
    - a list (or tuple) of any of these: their union. Every entry must match at least
      one module.

    ``exclude=`` takes the same forms and removes what it matches from the selection;
    each of its entries must match some module too, and it must leave at least one.

    Raises:
        deltahooks.TargetError: a target or exclude entry matches no module (the
            message lists the closest module paths), an exclude removes every target,
            or a pattern is malformed (an invalid ``"re:"`` regex, an empty string, a
            class that is not an ``nn.Module``).
        deltahooks.SpecError: invalid hyperparameters (raised when the spec is
            created, e.g. ``dh.LoRA(targets="q_proj", r=0)``, or at attach when they do
            not fit a module, e.g. an Adapter bottleneck wider than the module's
            output); a spec class instead of an instance (``dh.LoRA`` instead of
            ``dh.LoRA(targets=...)``) or an empty spec list; a ``name`` that is not an
            identifier; two parts of one delta adding the same tensor to one module.
        deltahooks.UnsupportedModuleError: the method cannot adapt a target's module
            type (LoRA on a LayerNorm or a grouped convolution, an Adapter on a module
            whose output width is unknown and no ``hidden_size``, Full on a module
            without parameters); narrow the targets with ``exclude=``.
        deltahooks.DeltaStateError: a delta with this ``name`` is already attached;
            the model's deltas would have nested roots (a submodule already carries
            deltas attached with it as the root); a Full target another delta already
            trains in full or has merged into.

        Every one of these derives from :class:`deltahooks.DeltaError`.

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
        >>> delta = dh.attach(model, [dh.LoRA(targets=["0"], r=2), dh.Full(targets=["1"])])
        >>> [n for n, p in model.named_parameters() if p.requires_grad]
        ['0.dh__default__lora_A', '0.dh__default__lora_B', '1.dh__default__weight', '1.dh__default__bias']
        >>> dh.attach(model, dh.LoRA(targets=["q_proj"]), name="other")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        deltahooks.errors.TargetError: target 'q_proj' matches no module or parameter of Sequential...
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach needs an nn.Module, got {type(model).__name__}")
    specs = _as_specs(spec)
    name = DEFAULT_NAME if name is None else name
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        raise SpecError(
            f"delta name {name!r} must be an identifier (letters, digits, '_'), e.g. 'task_a'"
        )
    found = list(registries_under(model))  # the deltas already on the model, read once
    for _, _, registry in found:
        if name in registry.deltas:
            raise DeltaStateError(
                f"a delta named {name!r} is already attached to this model; pass another "
                f"name=..., or detach it first (attached: {sorted(registry.deltas)})"
            )
    built = plan(model, specs)
    _refuse_layers_with_merged_scales(found, {part.path for part in built.parts})
    refuse_nested_roots(found)

    ledger = Ledger(model, name)
    switch = Switch(name)
    try:
        parts, shared = install_plan(ledger, built, switch)
        keep_trainable_layout(ledger)
        watch = liveness.watch(ledger, switch, name, parts, specs, shared)
        delta = Delta(model, name, specs, parts, shared, ledger, switch, freeze_base, watch)
        admit(model, name, delta, freeze_base)
    except BaseException:
        teardown(model, name, ledger, freeze_base)
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


def set_active(model: nn.Module, names: str | Iterable[str]) -> None:
    """Enable the named deltas on ``model`` and disable the rest (they stay attached).

    Several active deltas add up (each acts on what the layer computes, as when attached
    one after another). A compiled model switches without recompiling for deltas whose
    sites are hooks or parametrizations (every method but ``Full`` and prompt/prefix
    tuning, which change attributes or the call itself).

    Example:
        >>> import torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> a = dh.attach(model, dh.LoRA(targets=["0"]), name="a")
        >>> b = dh.attach(model, dh.LoRA(targets=["0"]), name="b")
        >>> dh.set_active(model, ["b"])
        >>> a.enabled, b.enabled
        (False, True)
    """
    wanted = {names} if isinstance(names, str) else set(names)
    found = deltas(model)
    unknown = sorted(wanted - set(found))
    if unknown:
        raise DeltaStateError(
            f"no delta named {unknown} on {type(model).__name__}; attached: {sorted(found)}"
        )
    merged = sorted(name for name, delta in found.items() if delta.merged and name not in wanted)
    if merged:
        raise DeltaStateError(
            f"deltas {merged} are merged into the weights, so they cannot be switched off; "
            "call delta.unmerge() on them first"
        )
    for name, delta in found.items():
        if name in wanted:
            delta.enable()
        else:
            delta.disable()


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
