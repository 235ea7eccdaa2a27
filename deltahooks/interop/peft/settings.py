"""What PEFT's adapter config can say, in both directions: its path-pattern rule, one value
of a setting per adapter, exact-path patterns for what differs per layer."""

from __future__ import annotations

import re
from collections import Counter

from torch import nn

from ...errors import UnsupportedOperationError
from ...targets import Paths, resolve_targets


def check_paths(model: nn.Module, paths) -> None:
    """Every adapted path names a module of ``model``; else the closest names are listed."""
    known = {p for p, _ in model.named_modules()}
    missing = [p for p in paths if p not in known]
    if missing:  # raises a TargetError that lists the closest module names
        resolve_targets(model, Paths(missing))


def peft_pattern(path: str, patterns: dict, default):
    """PEFT's rule for rank_pattern/alpha_pattern keys: a regex matching a path suffix."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", path):
            return value
    return default


def most_common(values: dict[str, float]):
    """The value most layers have: the adapter's own, the others become per-path patterns."""
    return Counter(values.values()).most_common(1)[0][0]


def exact(path: str) -> str:
    """A PEFT pattern key (regex matched on a ``.`` boundary) for exactly this path."""
    return re.escape(path)


def one_setting(method: str, specs: list, name: str):
    """The value all specs share for ``name``, or why PEFT cannot hold them together."""
    values = {repr(getattr(spec, name)) for spec in specs}
    if len(values) > 1:
        raise UnsupportedOperationError(
            f"the {method} specs of this delta differ in {name} ({sorted(values)}); PEFT holds "
            f"one {name} per adapter: save them as separate deltas"
        )
    return getattr(specs[0], name)
