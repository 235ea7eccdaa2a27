"""One exception hierarchy, so callers can catch everything deltahooks raises on purpose.

Each error also derives from the built-in exception a Python user would expect
(`ValueError` for bad arguments, `TypeError` for unsupported modules, ...), so
existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations

import os
import sys
import warnings

import torch


class DeltaError(Exception):
    """Base class of every error deltahooks raises deliberately."""


class TargetError(DeltaError, ValueError):
    """A target pattern is malformed or selects no module."""


class SpecError(DeltaError, ValueError):
    """A method's hyperparameters are invalid."""


class UnsupportedModuleError(DeltaError, TypeError):
    """A method was asked to adapt a module type it has no rule for."""


class DeltaStateError(DeltaError, RuntimeError):
    """An operation does not fit the delta's current state (detached, merged, ...)."""


class DeltaFileError(DeltaError, ValueError):
    """A delta file is missing, malformed, or does not fit the model."""


class UnsupportedOperationError(DeltaError, NotImplementedError):
    """The method cannot do this at all (e.g. merge a non-linear adapter into weights)."""


class DeltaWarning(UserWarning):
    """Something works but is probably not what was meant (e.g. a LoRA rank above full rank)."""


class DeadSiteWarning(DeltaWarning):
    """A delta acts through a hook on a module that the model's forward never called, so
    that part of it does nothing (its parent reads the module's weight directly, or skips it)."""


class NoGradientWarning(DeltaWarning):
    """A backward through the model's output gave some trainable delta tensors no gradient."""


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))


def _internal(frame, prefixes: tuple[str, ...]) -> bool:
    return os.path.abspath(frame.f_code.co_filename).startswith(prefixes)


def warn(message: str, category: type[Warning] = DeltaWarning) -> None:
    """Warn with the location of the user's call, not of deltahooks' internals (nor of
    torch's, for a warning raised from a hook that torch called)."""
    prefixes = (_PACKAGE_DIR, os.path.dirname(os.path.abspath(torch.__file__)))
    frame, level = sys._getframe(1), 2  # level 1 is this function
    while frame is not None and _internal(frame, prefixes):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
