"""dh.load: attach the delta a file holds, after checking that it fits, allocating nothing
the file has not earned.

The delta is planned on the ``meta`` device from the file's hyperparameters and the
model's layer widths, the plan is compared with the shapes in the safetensors header,
and only then are tensors read (a header claiming ``r = 2**40`` costs nothing to refuse).
"""

from __future__ import annotations

import os
from typing import Any

from torch import nn

from .attach import NAME_PATTERN, attach_with_state, deltas
from .errors import DeltaError, DeltaFileError, DeltaStateError
from .fitting import check_finite, check_layout
from .io import read_index, read_tensors
from .planning import plan
from .spec import METHODS, DeltaSpec
from .targets import Paths, parameter_paths


def specs_from_header(header: dict[str, Any]) -> list[DeltaSpec]:
    """The specs a file's header describes, each targeting exactly its recorded paths."""
    specs = []
    for part in header["parts"]:
        method = part["method"]
        if method not in METHODS:
            raise DeltaFileError(
                f"the file uses method {method!r}, which this deltahooks does not know "
                f"(known: {sorted(METHODS)}); upgrade deltahooks"
            )
        try:
            specs.append(METHODS[method](targets=Paths(part["paths"]), **part["hyperparameters"]))
        except (TypeError, ValueError, AttributeError) as err:  # SpecError is a ValueError
            raise DeltaFileError(
                f"the {method} hyperparameters in the file are invalid: {err}"
            ) from None
    return specs


def load(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    freeze_base: bool = True,
    allow_nonfinite: bool = False,
    into=None,
):
    """Attach the delta stored at ``path`` to ``model``, weights included.

    Nothing changes unless every module path, tensor shape and dtype fits. With
    ``into=delta`` (a delta attached to ``model``) the file's tensors replace that delta's
    values in place instead (hot-swap: same tensors, so a compiled model does not
    recompile); they must have its keys, shapes and dtype kinds.

    Example:
        >>> import os, tempfile, torch, deltahooks as dh
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "lora.safetensors")
        >>> dh.attach(model, dh.LoRA(targets=["0"], r=2)).save(path)
        >>> dh.detach(model)
        >>> delta = dh.load(model, path)
        >>> delta.paths
        ['0']
    """
    where = os.fspath(path)
    header, stored = read_index(where)  # no tensor read before everything fits
    if into is not None:
        return _swap_into(model, into, where, stored, allow_nonfinite)
    specs = specs_from_header(header)
    paths = [p for part in header["parts"] for p in part["paths"]]
    missing = [p for p in paths if not _has_module(model, p)]
    if missing:
        raise DeltaFileError(
            f"{where!r} was made for another model: module paths {missing[:5]} do not exist "
            f"in {type(model).__name__}{_prefix_hint(model, paths)}"
        )
    if name is None:
        name = header.get("name", "default")
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
            raise DeltaFileError(f"{where!r}: the stored delta name {name!r} is invalid")
    # Plan on the meta device and compare with what the file stores before allocating
    # anything: a header that claims a huge rank or width costs nothing to refuse.
    try:
        planned = plan(model, tuple(specs), device="meta").tensors()
    except DeltaError as err:
        raise DeltaFileError(f"{where!r} does not fit this model: {err}") from None
    except (RuntimeError, TypeError, OverflowError) as err:  # sizes past int64, even on meta
        raise DeltaFileError(
            f"{where!r}: its hyperparameters ask for tensors too large to exist ({err})"
        ) from None
    check_layout(where, stored, planned)
    tensors = read_tensors(where)  # no larger than the file itself
    if not allow_nonfinite:
        check_finite(where, tensors)
    return attach_with_state(model, specs, tensors, name=name, freeze_base=freeze_base)


def _swap_into(model: nn.Module, delta, where: str, stored: dict, allow_nonfinite: bool):
    """Copy the file's tensors into an attached delta after checking they fit it exactly."""
    if not any(found is delta for found in deltas(model).values()):
        raise DeltaStateError(
            f"into= names delta {getattr(delta, 'name', delta)!r}, which is not attached to "
            f"{type(model).__name__}; pass one of dh.deltas(model)"
        )
    if delta.merged:
        raise DeltaStateError(
            f"delta {delta.name!r} is merged: new values would not reach the merged weights; "
            "call delta.unmerge() first"
        )
    check_layout(where, stored, delta.state_dict())
    tensors = read_tensors(where)
    if not allow_nonfinite:
        check_finite(where, tensors)
    delta.load_state_dict(tensors)
    return delta


def _has_module(model: nn.Module, path: str) -> bool:
    """A module at ``path``, or a parameter there (a parameter target's recorded path)."""
    try:
        model.get_submodule(path)
    except AttributeError:
        owner_path, _, name = path.rpartition(".")
        try:
            owner = model.get_submodule(owner_path)
        except AttributeError:
            return False
        return any(found == name for found, _ in parameter_paths(owner) if "." not in found)
    return True


def _prefix_hint(model: nn.Module, paths: list[str]) -> str:
    """Why paths are missing when the file fits a model that contains, or is inside, this one."""
    known = {p for p, _ in model.named_modules()}
    if not paths or "" in paths:
        return ""
    pieces = paths[0].split(".")
    for depth in range(1, len(pieces)):
        prefix = ".".join(pieces[:depth]) + "."
        if all(p.startswith(prefix) and p[len(prefix) :] in known for p in paths):
            return (
                f". Its paths all start with {prefix!r}: it was saved from a model that holds "
                f"this one as {prefix[:-1]!r}; load it into that outer model instead"
            )
    suffix = "." + paths[0]
    for inner in sorted((k[: -len(suffix)] for k in known if k.endswith(suffix)), key=len):
        if all(f"{inner}.{p}" in known for p in paths):
            return (
                f". The paths exist under {inner!r}: it was saved from that submodule; load it "
                f"with dh.load(model.get_submodule({inner!r}), path)"
            )
    return ""
