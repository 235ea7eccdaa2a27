"""Target syntax → resolved module paths.

Every method shares this one grammar, so "where a delta goes" never depends on
"what the delta is". A target is one of:

- a module-path suffix on a ``.`` boundary: ``"q_proj"`` matches
  ``model.layers.3.self_attn.q_proj``; a full path matches itself;
- a glob (contains ``*``, ``?`` or ``[``), also anchored on a ``.`` boundary:
  ``"layers.*.mlp.*"``;
- ``"re:<regex>"``: the regex must match the whole path;
- ``"all-linear"``: every ``nn.Linear`` / transformers ``Conv1D`` except the output head;
- an ``nn.Module`` subclass (``isinstance``);
- an ``nn.Module`` object: exactly that submodule (by identity);
- a callable ``(path, module) -> bool`` (one with a ``no_match_hint`` string attribute,
  such as a method's default selection, says that when it matches nothing);
- :class:`Paths`: exact module paths (what a saved file records);
- a list or tuple of the above (their union).

Parameter targets (``resolve_targets(..., parameters=True)``, for methods that can adapt
a bare parameter, such as LoRA on an MoE expert stack): a string or :class:`Paths` entry
that matches no module is matched against *parameter paths*, ``<module path>.<name>`` for
every parameter registered on a module itself (what ``model.named_parameters()`` lists),
and each hit resolves to a :class:`ParameterPath` with its owning module. A string that
matches a module always targets modules, so ``"q_proj"`` never means a parameter and
``"q_proj.weight"`` (no module has that path) always does.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable

from torch import nn
from torch.nn.utils import parametrize

from .errors import TargetError
from .layers import is_linear_like
from .ledger import is_reserved

ALL_LINEAR = "all-linear"
_GLOB_CHARS = frozenset("*?[")


class Paths(tuple):
    """Exact module paths, e.g. ``Paths(["layers.0.q_proj"])``: no suffix or pattern logic.

    Example:
        >>> from deltahooks import Paths
        >>> Paths(["encoder.layer.0.attention.self.query"])
        Paths(['encoder.layer.0.attention.self.query'])
    """

    def __new__(cls, paths: Iterable[str]) -> Paths:
        return super().__new__(cls, paths)

    def __repr__(self) -> str:
        return f"Paths({list(self)!r})"


Target = str | type | nn.Module | Callable[[str, nn.Module], bool] | Paths | list | tuple


class ParameterPath(str):
    """A resolved target that names a parameter, ``"<module path>.<parameter name>"``.

    :func:`resolve_targets` with ``parameters=True`` returns it, paired with the module
    that owns the parameter, for a target that names a parameter rather than a module.

    Example:
        >>> path = ParameterPath("model.layers.0.mlp.experts.gate_up_proj")
        >>> path.module_path, path.name
        ('model.layers.0.mlp.experts', 'gate_up_proj')
    """

    __slots__ = ()

    @property
    def module_path(self) -> str:
        """The path of the module that holds the parameter (``""``: the root)."""
        return self.rpartition(".")[0]

    @property
    def name(self) -> str:
        """The parameter's name on its module."""
        return self.rpartition(".")[2]


def adaptable_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``model.named_modules()`` without what torch's parametrizations hold: a
    ``parametrizations`` container, its ``ParametrizationList`` s and their functions
    (``weight_norm``'s ``_WeightNorm``, a delta's own weight site) are part of how a
    tensor is computed, not layers a target can name (a suffix ``"0"`` would otherwise
    match ``conv.parametrizations.weight.0``).

    Example:
        >>> from torch import nn
        >>> layer = nn.utils.parametrizations.weight_norm(nn.Linear(2, 2))
        >>> [p for p, _ in adaptable_modules(nn.Sequential(layer))]
        ['', '0']
    """
    containers = []
    found = []
    for path, module in model.named_modules():
        if any(path == c or path.startswith(c + ".") for c in containers):
            continue
        found.append((path, module))
        if parametrize.is_parametrized(module):
            containers.append(f"{path}.parametrizations" if path else "parametrizations")
    return found


def parameter_paths(model: nn.Module) -> list[tuple[ParameterPath, nn.Module]]:
    """``[(parameter path, owning module)]`` of every parameter registered on a module itself,
    in ``named_modules()`` order and each module's own parameter order; delta tensors and
    torch's ``parametrizations`` containers are left out, a parametrized parameter is
    listed under its own name."""
    found = []
    for path, module in model.named_modules():
        if isinstance(module, parametrize.ParametrizationList) or path.endswith("parametrizations"):
            continue
        names = [n for n, p in module._parameters.items() if p is not None and not is_reserved(n)]
        if parametrize.is_parametrized(module):
            for name, chain in module.parametrizations.items():
                # one ``original``, or ``original0``, ``original1``, ... (e.g. weight_norm's)
                trained = any(key.startswith("original") for key in chain._parameters)
                if trained and name not in names:
                    names.append(name)
        found.extend((ParameterPath(f"{path}.{n}" if path else n), module) for n in names)
    return found


def _output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head: HF's output embeddings if it has them, else its last linear."""
    getter = getattr(model, "get_output_embeddings", None)
    if callable(getter):
        try:
            head = getter()
        except (NotImplementedError, AttributeError):
            head = None
        if head is not None:
            return head
    last = None
    for _, module in model.named_modules():
        if is_linear_like(module):
            last = module
    return last


def _split(targets: Target) -> list:
    if isinstance(targets, Paths):
        return [targets]
    if isinstance(targets, (list, tuple)):
        return list(targets)
    return [targets]


def _entry_matcher(entry, model: nn.Module) -> Callable[[str, nn.Module], bool]:
    """Compile one target entry into a predicate over (path, module)."""
    if isinstance(entry, Paths):
        wanted = frozenset(entry)
        return lambda path, module: path in wanted
    if isinstance(entry, nn.Module):  # before `callable`: modules are callable too
        return lambda path, module: module is entry
    if isinstance(entry, type):
        if not issubclass(entry, nn.Module):
            raise TargetError(
                f"target type {entry.__name__} is not an nn.Module subclass; "
                "pass a module class such as nn.Linear"
            )
        return lambda path, module: isinstance(module, entry)
    if isinstance(entry, str):
        if entry == ALL_LINEAR:
            head = _output_head(model)
            return lambda path, module: is_linear_like(module) and module is not head
        if entry.startswith("re:"):
            try:
                pattern = re.compile(entry[3:])
            except re.error as err:
                raise TargetError(
                    f"target {entry!r} is not a valid regular expression ({err}); "
                    "fix the pattern or drop the 're:' prefix to match a name suffix"
                ) from None
            return lambda path, module: pattern.fullmatch(path) is not None
        if not entry:
            raise TargetError("an empty string is not a target; name a module, e.g. 'q_proj'")
        if _GLOB_CHARS & set(entry):
            anchored = "*." + entry
            return lambda path, module: (
                fnmatch.fnmatchcase(path, entry) or fnmatch.fnmatchcase(path, anchored)
            )
        dotted = "." + entry
        return lambda path, module: path == entry or path.endswith(dotted)
    if callable(entry):
        return lambda path, module: bool(entry(path, module))
    raise TargetError(
        f"cannot use {entry!r} as a target; use a name suffix, 're:<regex>', a glob, "
        "'all-linear', an nn.Module subclass or object, or a callable (path, module) -> bool"
    )


def describe(targets: Target) -> object:
    """A JSON-friendly description of a target, for file metadata and summaries."""
    if isinstance(targets, Paths):
        return list(targets)
    if isinstance(targets, (list, tuple)):
        return [describe(t) for t in targets]
    if isinstance(targets, str):
        return targets
    if isinstance(targets, type):
        return f"type:{targets.__module__}.{targets.__qualname__}"
    if isinstance(targets, nn.Module):
        return f"module:{type(targets).__name__}"
    return f"callable:{getattr(targets, '__qualname__', repr(targets))}"


def _closest(entry, model: nn.Module, limit: int = 5, paths: list[str] | None = None) -> list[str]:
    paths = [p for p, _ in model.named_modules() if p] if paths is None else paths
    if isinstance(entry, Paths) and entry:
        entry = entry[0]
    if not isinstance(entry, str):
        return paths[:limit]
    probe = entry[3:] if entry.startswith("re:") else entry
    leaf_to_path: dict[str, str] = {}
    for p in paths:
        leaf_to_path.setdefault(p.rsplit(".", 1)[-1], p)
    near = difflib.get_close_matches(probe, list(leaf_to_path), n=limit, cutoff=0.4)
    found = [leaf_to_path[leaf] for leaf in near]
    for p in difflib.get_close_matches(probe, paths, n=limit, cutoff=0.4):
        if p not in found:
            found.append(p)
    return found[:limit] or paths[:limit]


KEYWORDS = (ALL_LINEAR,)


def _did_you_mean(entry) -> str:
    """A hint when a string looks like a misspelt keyword ('all_linear', 'All-Linear')."""
    if not isinstance(entry, str):
        return ""
    folded = entry.lower().replace("_", "-").replace(" ", "-")
    near = difflib.get_close_matches(folded, KEYWORDS, n=1, cutoff=0.8)
    return f" Did you mean {near[0]!r}?" if near else ""


def _no_match_error(entry, model: nn.Module, what: str, parameters: bool = False) -> TargetError:
    hint = getattr(entry, "no_match_hint", None)
    if callable(entry) and isinstance(hint, str):  # a method's default selection explains itself
        return TargetError(
            f"{what} {describe(entry)!r} matches no module of {type(model).__name__}: {hint}"
        )
    if isinstance(entry, nn.Module):
        return TargetError(
            f"{what} {type(entry).__name__} object is not a submodule of {type(model).__name__}; "
            "pass a module of this model (e.g. model.layers[0].q_proj) or a name pattern"
        )
    near = _closest(entry, model)
    leaves = sorted({p.rsplit(".", 1)[-1] for p, _ in model.named_modules() if p})
    nothing, parameter_hint = "module", ""
    if parameters:
        candidates = [str(p) for p, _ in parameter_paths(model)]
        nothing = "module or parameter"
        parameter_hint = f"Closest parameter paths: {_closest(entry, model, paths=candidates)}. "
    return TargetError(
        f"{what} {describe(entry)!r} matches no {nothing} of {type(model).__name__}."
        f"{_did_you_mean(entry)} Closest module paths: {near}. {parameter_hint}"
        f"Module names in this model: {leaves[:30]}"
        f"{' ...' if len(leaves) > 30 else ''}. Fix the pattern (a name suffix matches on a "
        "'.' boundary; use 're:' for a regex)."
    )


def resolve_targets(
    model: nn.Module, targets: Target, exclude: Target | None = None, *, parameters: bool = False
) -> list[tuple[str, nn.Module]]:
    """Resolve targets to ``[(path, module)]`` in ``model.named_modules()`` order.

    Every entry of ``targets`` must match at least one module, and so must every
    entry of ``exclude``; a selection that ``exclude`` empties is an error too. With
    ``parameters=True`` a string or :class:`Paths` entry that matches no module may match
    parameter paths instead (see the module docstring): those resolve to
    ``(ParameterPath, owning module)``, listed right after their module's place.

    Example:
        >>> from torch import nn
        >>> from deltahooks import resolve_targets
        >>> model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> [p for p, _ in resolve_targets(model, nn.Linear, exclude="2")]
        ['0']
        >>> [p for p, _ in resolve_targets(model, "2.weight", parameters=True)]
        ['2.weight']
    """
    named = adaptable_modules(model)
    params = parameter_paths(model) if parameters else []

    def hits(entry, what: str) -> tuple[set[int], set[int]]:
        matcher = _entry_matcher(entry, model)
        found = {i for i, (path, module) in enumerate(named) if matcher(path, module)}
        found_params: set[int] = set()
        if params and isinstance(entry, Paths):  # path by path: a module path, else a parameter
            left = set(entry) - {named[i][0] for i in found}
            found_params = {i for i, (path, _) in enumerate(params) if path in left}
        elif params and isinstance(entry, str) and not found:
            found_params = {i for i, (path, module) in enumerate(params) if matcher(path, module)}
        if not found and not found_params:
            raise _no_match_error(entry, model, what, parameters)
        return found, found_params

    selected: set[int] = set()
    selected_params: set[int] = set()
    for entry in _split(targets):
        found, found_params = hits(entry, "target")
        selected |= found
        selected_params |= found_params
    if exclude is not None:
        for entry in _split(exclude):
            found, found_params = hits(entry, "exclude entry")
            selected -= found
            selected_params -= found_params
        if not selected and not selected_params:
            raise TargetError(
                f"exclude={describe(exclude)!r} removes every module that "
                f"targets={describe(targets)!r} selects; narrow exclude or widen targets"
            )
    if not selected_params:
        return [named[i] for i in sorted(selected)]
    by_owner: dict[int, list[tuple[str, nn.Module]]] = {}
    for i in sorted(selected_params):
        by_owner.setdefault(id(params[i][1]), []).append(params[i])
    resolved = []
    for i, (path, module) in enumerate(named):
        if i in selected:
            resolved.append((path, module))
        resolved.extend(by_owner.pop(id(module), ()))
    return resolved


def first_match(path: str, module: nn.Module, patterns: dict, model: nn.Module):
    """The value of the first pattern key (target syntax) that selects ``path``, else None."""
    for key, value in patterns.items():
        if _entry_matcher(key, model)(path, module):
            return value
    return None
