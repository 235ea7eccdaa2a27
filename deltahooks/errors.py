"""One exception hierarchy, so callers can catch everything deltahooks raises on purpose.

Each error also derives from the built-in exception a Python user would expect
(`ValueError` for bad arguments, `TypeError` for unsupported modules, ...), so
existing ``except ValueError`` code keeps working.
"""

from __future__ import annotations


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
