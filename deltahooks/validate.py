"""Hyperparameter checks shared by every method, each raising a SpecError that names the fix.

``owner`` names what is checked in the message: a spec (its class name, so a method's name
is written once, on its class) or a string (a function's name). ``True`` is an ``int`` to
Python but never a size or a rate here, so every numeric check refuses bools.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from .errors import SpecError


def name_of(owner: object) -> str:
    """``owner`` itself when it is a string, else the name of its class.

    Example:
        >>> import deltahooks as dh
        >>> name_of(dh.LoRA(targets=["q_proj"])), name_of("loraplus_param_groups")
        ('LoRA', 'loraplus_param_groups')
    """
    return owner if isinstance(owner, str) else type(owner).__name__


def is_number(value: object) -> bool:
    """A real int or float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(owner: object, name: str, value: object, example: int = 8) -> None:
    """``value`` is an int > 0 (not a bool).

    Example:
        >>> positive_int("LoRA", "r", 0)
        Traceback (most recent call last):
        deltahooks.errors.SpecError: LoRA r=0 must be a positive integer, e.g. r=8
    """
    if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
        raise SpecError(
            f"{name_of(owner)} {name}={value!r} must be a positive integer, e.g. {name}={example}"
        )


def optional_positive_int(owner: object, name: str, value: object, example: int = 8) -> None:
    if value is not None:
        positive_int(owner, name, value, example)


def finite(owner: object, name: str, value: object, *, minimum: float | None = None) -> None:
    """``value`` is a finite number, at least ``minimum`` when given."""
    if not is_number(value) or not math.isfinite(value):
        raise SpecError(f"{name_of(owner)} {name}={value!r} must be a finite number")
    if minimum is not None and value < minimum:
        raise SpecError(f"{name_of(owner)} {name}={value!r} must be a finite number >= {minimum}")


def probability(owner: object, name: str, value: object) -> None:
    """``value`` is a number in [0, 1): a dropout rate."""
    if not is_number(value) or not (0.0 <= value < 1.0):
        raise SpecError(
            f"{name_of(owner)} {name}={value!r} must be a number in [0, 1); use 0 to switch it off"
        )


def flag(owner: object, name: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"{name_of(owner)} {name}={value!r} must be True or False")


def one_of(owner: object, name: str, value: object, choices: Iterable[str]) -> None:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise SpecError(f"{name_of(owner)} {name}={value!r} is unknown; choose one of {choices}")


def pattern_dict(owner: object, name: str, value: object, example: str) -> None:
    """A ``{target pattern: value}`` dict with string keys."""
    if not isinstance(value, dict):
        raise SpecError(f"{name_of(owner)} {name} must be a dict such as {example}, got {value!r}")
    if not all(isinstance(key, str) for key in value):
        raise SpecError(f"{name_of(owner)} {name} keys must be target strings such as 'down_proj'")
