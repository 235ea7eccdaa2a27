"""Delta files: one ``.safetensors`` file, tensors plus a JSON header, never pickle.

The header (safetensors ``__metadata__``, string → string) holds:

- ``format``: ``"deltahooks.delta"``;
- ``format_version``: an integer as text; readers refuse versions newer than theirs;
- ``deltahooks_version``: the writer's package version;
- ``delta``: JSON ``{"name", "parts": [{"method", "hyperparameters", "targets",
  "exclude", "paths"}], "shapes": {key: [dims]}}``, where ``paths`` are the resolved
  module paths, so loading re-attaches to exactly those modules.

Loading checks every path and shape against the model before it changes anything.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import stat
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .errors import DeltaError, DeltaFileError
from .targets import Paths

FORMAT = "deltahooks.delta"
FORMAT_VERSION = 1


def _version() -> str:
    from . import __version__

    return __version__


def save_delta(delta, path: str | os.PathLike) -> None:
    """Write ``delta`` to ``path`` (see the module docstring for the layout).

    The file appears whole or not at all: it is written next to ``path`` under a
    temporary name and renamed over it, with the permissions a new file gets (0644
    under the usual umask).
    """
    target = os.fspath(path)
    tensors = {
        key: tensor.detach().to("cpu").contiguous().clone()
        for key, tensor in delta.state_dict().items()
    }
    for key, tensor in tensors.items():
        if tensor.device.type == "meta":
            raise DeltaFileError(f"cannot save {key!r}: it is on the meta device (no values)")
    parts = []
    for index, spec in enumerate(delta.specs):
        info = spec.describe()
        info["paths"] = [p.path for p in delta._parts if p.spec_index == index]
        parts.append(info)
    header = {
        "name": delta.name,
        "parts": parts,
        "shapes": {key: list(t.shape) for key, t in tensors.items()},
    }
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "deltahooks_version": _version(),
        "delta": json.dumps(header),
    }
    _check_writable(target)
    folder = os.path.dirname(os.path.abspath(target))
    temporary = os.path.join(folder, f".{os.path.basename(target)}.{secrets.token_hex(6)}.tmp")
    try:
        # O_EXCL: never write through someone else's file. The kernel applies the umask to
        # 0o666 as open() does; safetensors writes a file of its own (0600), so copy the mode.
        os.close(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        mode = stat.S_IMODE(os.stat(temporary).st_mode)
        save_file(tensors, temporary, metadata=metadata)
        os.chmod(temporary, mode)
        os.replace(temporary, target)
    except (OSError, SafetensorError) as err:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise DeltaFileError(f"cannot write the delta to {target!r}: {reason}") from None


def _check_writable(target: str) -> None:
    if os.path.isdir(target):
        raise DeltaFileError(
            f"cannot save the delta to {target!r}: it is a directory; pass a file path such as "
            f"{os.path.join(target, 'delta.safetensors')!r}"
        )
    folder = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(folder):
        raise DeltaFileError(
            f"cannot save the delta to {target!r}: the folder {folder!r} does not exist; "
            "create it first (os.makedirs(folder, exist_ok=True))"
        )


def read_header(path: str | os.PathLike) -> dict[str, Any]:
    """Parse and validate a delta file's metadata without reading tensors.

    Example:
        >>> import os, tempfile, torch, deltahooks as dh
        >>> from deltahooks.io import read_header
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4))
        >>> path = os.path.join(tempfile.mkdtemp(), "lora.safetensors")
        >>> dh.attach(model, dh.LoRA(targets=["0"], r=2)).save(path)
        >>> read_header(path)["parts"][0]["paths"]
        ['0']
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DeltaFileError(f"delta file {path!r} does not exist; check the path")
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise DeltaFileError(
                f"{path!r} is a PEFT adapter directory, not a deltahooks file; load it with "
                "dh.load_peft(model, directory)"
            )
        found = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[:5]
        raise DeltaFileError(
            f"{path!r} is a directory; pass the .safetensors file that delta.save() wrote"
            + (f" (it holds {found})" if found else "")
        )
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
    except (SafetensorError, OSError, ValueError) as err:
        raise DeltaFileError(
            f"{path!r} is not a readable safetensors file ({err}); was it written by delta.save()?"
        ) from None
    if not metadata or metadata.get("format") != FORMAT:
        raise DeltaFileError(
            f"{path!r} has no deltahooks metadata (format={None if not metadata else metadata.get('format')!r}); "
            "it was not written by delta.save(). For PEFT adapters use the PEFT importer"
        )
    try:
        version = int(metadata.get("format_version", ""))
    except ValueError:
        raise DeltaFileError(f"{path!r}: format_version is not an integer") from None
    if version > FORMAT_VERSION:
        raise DeltaFileError(
            f"{path!r} uses delta format version {version}, newer than this deltahooks "
            f"({_version()}, format {FORMAT_VERSION}); upgrade deltahooks to read it"
        )
    try:
        header = json.loads(metadata.get("delta", ""))
        _check_header(header)
    except (json.JSONDecodeError, TypeError, KeyError, ValueError) as err:
        raise DeltaFileError(f"{path!r}: the delta metadata is ill-formed ({err})") from None
    return header


def _check_header(header: Any) -> None:
    if not isinstance(header, dict) or not isinstance(header.get("parts"), list):
        raise ValueError("expected an object with a 'parts' list")
    shapes = header.get("shapes")
    if not isinstance(shapes, dict) or not all(_is_shape(v) for v in shapes.values()):
        raise ValueError("expected a 'shapes' object of lists of non-negative integers")
    for part in header["parts"]:
        if not isinstance(part, dict) or not isinstance(part.get("method"), str):
            raise ValueError("each part needs a 'method' string")
        if not isinstance(part.get("hyperparameters"), dict):
            raise ValueError("each part needs a 'hyperparameters' object")
        paths = part.get("paths")
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise ValueError("each part needs a 'paths' list of strings")


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value
    )


def specs_from_header(header: dict[str, Any]) -> list:
    from .spec import METHODS

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


def load_delta(
    model: nn.Module,
    path: str | os.PathLike,
    name: str | None = None,
    *,
    freeze_base: bool = True,
    allow_nonfinite: bool = False,
):
    """Attach the delta stored at ``path`` to ``model``, weights included.

    Nothing changes unless every module path, tensor shape and dtype fits.

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
    from .attach import NAME_PATTERN, attach_with_state, plan_parts

    where = os.fspath(path)
    header = read_header(path)
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
        parts = plan_parts(model, tuple(specs), device="meta")
    except DeltaError as err:
        raise DeltaFileError(f"{where!r} does not fit this model: {err}") from None
    planned = {}
    for part in parts:
        for (owner, local), (value, _) in part.tensors.items():
            planned[f"{owner}.{local}" if owner else local] = value
    _check_layout(where, _stored_layout(where), planned)
    tensors = _read_tensors(where)  # no larger than the file itself
    if not allow_nonfinite:
        _check_finite(where, tensors)
    return attach_with_state(model, specs, tensors, name=name, freeze_base=freeze_base)


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
    except AttributeError:
        return False
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


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


def _stored_layout(path: str) -> dict[str, tuple[list[int], str]]:
    """Each stored tensor's shape and dtype, read from the header without reading data."""
    try:
        with safe_open(path, framework="pt") as handle:
            return {
                key: (list(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DeltaFileError(f"{path!r}: cannot read tensors ({err})") from None


def _read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DeltaFileError(f"{path!r}: cannot read tensors ({err})") from None


def _check_layout(where: str, stored: dict, planned: dict[str, torch.Tensor]) -> None:
    """The file's tensors are exactly the planned ones, shape for shape, float for float."""
    missing = [k for k in planned if k not in stored]
    extra = [k for k in stored if k not in planned]
    if missing or extra:
        raise DeltaFileError(
            f"{where!r}: tensors do not match its own spec: missing {missing[:5]}, extra {extra[:5]}"
        )
    for key, want in planned.items():
        shape, dtype = stored[key]
        if shape != list(want.shape):
            raise DeltaFileError(
                f"{where!r}: tensor {key!r} has shape {shape}, but the model needs "
                f"{list(want.shape)}"
            )
        if (dtype in FLOAT_DTYPES) != want.is_floating_point():
            raise DeltaFileError(
                f"{where!r}: tensor {key!r} has dtype {dtype}, the model needs {want.dtype}"
            )


def _check_finite(where: str, tensors: dict[str, torch.Tensor]) -> None:
    for key, have in tensors.items():
        if have.is_floating_point() and have.numel() and not bool(torch.isfinite(have).all()):
            raise DeltaFileError(
                f"{where!r}: tensor {key!r} contains NaN or Inf; pass allow_nonfinite=True "
                "to load it anyway"
            )


def describe_file(path: str | os.PathLike) -> str:
    """A human-readable description of a delta file and the module paths of each part.

    Used by ``deltahooks info``; lists at most 20 paths per part.
    """
    header = read_header(path)
    size = os.path.getsize(path)
    count = sum(math.prod(shape) for shape, _ in _stored_layout(os.fspath(path)).values())
    lines = [f"{os.fspath(path)}: delta {header.get('name')!r}, {count:,} values, {size:,} bytes"]
    shown = 20
    for part in header["parts"]:
        paths = part["paths"]
        settings = [f"{key}={value!r}" for key, value in part["hyperparameters"].items()]
        noun = "module" if len(paths) == 1 else "modules"
        lines.append(f"  {' '.join([part['method'], *settings])} on {len(paths)} {noun}:")
        lines.extend(f"    {p or '<root>'}" for p in paths[:shown])
        if len(paths) > shown:
            lines.append(f"    ... and {len(paths) - shown} more")
    return "\n".join(lines)
