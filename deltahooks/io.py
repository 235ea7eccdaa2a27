"""Delta files: one ``.safetensors`` file, tensors plus a JSON header, never pickle.

The header (safetensors ``__metadata__``, string → string) holds:

- ``format``: ``"deltahooks.delta"``;
- ``format_version``: an integer as text; readers refuse versions newer than theirs;
- ``deltahooks_version``: the writer's package version;
- ``delta``: JSON ``{"name", "parts": [{"method", "hyperparameters", "targets",
  "exclude", "paths"}], "shapes": {key: [dims]}}``, where ``paths`` are the resolved
  module paths, so loading re-attaches to exactly those modules.

This module is the format only; :mod:`deltahooks.loading` attaches what a file holds.
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

from .errors import DeltaFileError
from .version import __version__

FORMAT = "deltahooks.delta"
FORMAT_VERSION = 1


def write_delta(
    path: str | os.PathLike, name: str, parts: list[dict[str, Any]], state: dict[str, torch.Tensor]
) -> None:
    """Write a delta file: ``state`` tensors, and per part its description and ``paths``.

    The file appears whole or not at all: it is written next to ``path`` under a
    temporary name and renamed over it, with the permissions a new file gets (0644
    under the usual umask).
    """
    target = os.fspath(path)
    tensors = {key: tensor.detach().to("cpu").contiguous().clone() for key, tensor in state.items()}
    for key, tensor in state.items():
        if tensor.device.type == "meta":
            raise DeltaFileError(f"cannot save {key!r}: it is on the meta device (no values)")
    header = {
        "name": name,
        "parts": parts,
        "shapes": {key: list(t.shape) for key, t in tensors.items()},
    }
    metadata = {
        "format": FORMAT,
        "format_version": str(FORMAT_VERSION),
        "deltahooks_version": __version__,
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
            f"({__version__}, format {FORMAT_VERSION}); upgrade deltahooks to read it"
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


FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64", "F8_E4M3", "F8_E5M2"})


def stored_layout(path: str) -> dict[str, tuple[list[int], str]]:
    """Each stored tensor's shape and dtype, read from the header without reading data."""
    try:
        with safe_open(path, framework="pt") as handle:
            return {
                key: (list(handle.get_slice(key).get_shape()), handle.get_slice(key).get_dtype())
                for key in handle.keys()
            }
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DeltaFileError(f"{path!r}: cannot read tensors ({err})") from None


def read_index(
    path: str | os.PathLike,
) -> tuple[dict[str, Any], dict[str, tuple[list[int], str]]]:
    """A delta file's header (:func:`read_header`) and each stored tensor's shape and dtype
    (:func:`stored_layout`): all that ``dh.load`` checks before it reads a tensor."""
    header = read_header(path)
    return header, stored_layout(os.fspath(path))


def read_tensors(path: str) -> dict[str, torch.Tensor]:
    try:
        with safe_open(path, framework="pt") as handle:
            return {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise DeltaFileError(f"{path!r}: cannot read tensors ({err})") from None


def describe_file(path: str | os.PathLike) -> str:
    """A human-readable description of a delta file and the module paths of each part.

    Used by ``deltahooks info``; lists at most 20 paths per part.
    """
    header = read_header(path)
    size = os.path.getsize(path)
    count = sum(math.prod(shape) for shape, _ in stored_layout(os.fspath(path)).values())
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
