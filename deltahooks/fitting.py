"""Whether given tensors fit a delta: the checks made before a single value is copied.

Pure functions over names, shapes and dtypes, so that ``Delta.load_state_dict`` and
``dh.load`` (a file's header against the plan, the values it holds) refuse a misfit
whole, with the same words, and change nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from .errors import DeltaFileError
from .io import FLOAT_DTYPES


def fitting_pairs(
    name: str,
    own: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    strict: bool,
) -> tuple[list[tuple[torch.Tensor, torch.Tensor]], list[str], list[str]]:
    """``(target, value)`` for every key of ``state_dict`` the delta holds, after checking
    that each value has its target's shape and kind of dtype; and the missing and
    unexpected keys (an error when ``strict``).

    ``own`` maps the delta ``name``'s ``state_dict`` keys to its live tensors.

    Example:
        >>> import torch
        >>> own = {"0.lora_A": torch.zeros(2, 4)}
        >>> pairs, missing, unexpected = fitting_pairs("d", own, {"0.lora_A": torch.ones(2, 4)}, True)
        >>> len(pairs), missing, unexpected
        (1, [], [])
    """
    missing = [key for key in own if key not in state_dict]
    unexpected = [key for key in state_dict if key not in own]
    if strict and (missing or unexpected):
        raise DeltaFileError(
            f"delta {name!r} state_dict does not fit: missing keys {missing[:10]}, "
            f"unexpected keys {unexpected[:10]}; pass strict=False to load the overlap"
        )
    pairs = []
    for key, target in own.items():
        if key not in state_dict:
            continue
        value = state_dict[key]
        if tuple(value.shape) != tuple(target.shape):
            raise DeltaFileError(
                f"tensor {key!r} has shape {list(value.shape)}, but the delta expects "
                f"{list(target.shape)}; was it saved with another rank or model?"
            )
        if value.is_floating_point() != target.is_floating_point():
            raise DeltaFileError(
                f"tensor {key!r} has dtype {value.dtype}, but the delta holds {target.dtype}"
            )
        pairs.append((target, value))
    return pairs, missing, unexpected


def check_layout(where: str, stored: dict, planned: Mapping[str, torch.Tensor]) -> None:
    """The file's tensors are exactly the planned ones, shape for shape, float for float.

    ``stored`` is what :func:`deltahooks.io.stored_layout` read from the file's header.
    """
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


def check_finite(where: str, tensors: Mapping[str, torch.Tensor]) -> None:
    """Every floating tensor of the file at ``where`` holds finite values only."""
    for key, have in tensors.items():
        if have.is_floating_point() and have.numel() and not bool(torch.isfinite(have).all()):
            raise DeltaFileError(
                f"{where!r}: tensor {key!r} contains NaN or Inf; pass allow_nonfinite=True "
                "to load it anyway"
            )
