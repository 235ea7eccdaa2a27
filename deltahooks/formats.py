"""Writers of other libraries' adapter formats, found by name.

:meth:`Delta.save_peft <deltahooks.Delta.save_peft>` writes through the writer that
:mod:`deltahooks.interop` registers here when ``deltahooks`` is imported, so the Delta
(a floor below interop) never imports the converters it hands itself to.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Protocol

from torch import nn

from .errors import UnsupportedOperationError


class Writer(Protocol):
    """``writer(delta, directory, *, task_type)``: ``delta`` is a :class:`~deltahooks.Delta`
    (named here as the ``nn.Module`` it is, so this floor needs nothing above it)."""

    def __call__(
        self, delta: nn.Module, directory: str | os.PathLike, *, task_type: str | None = None
    ) -> None: ...


WRITERS: dict[str, Writer] = {}
"""format name (``"peft"``) → ``writer(delta, directory, *, task_type)``."""


def register_writer(name: str) -> Callable[[Writer], Writer]:
    """Register the writer of format ``name``; used as a decorator by :mod:`deltahooks.interop`."""

    def register(writer: Writer) -> Writer:
        WRITERS[name] = writer
        return writer

    return register


def writer(name: str) -> Writer:
    """The registered writer of format ``name``."""
    found = WRITERS.get(name)
    if found is None:
        raise UnsupportedOperationError(
            f"no writer of the {name!r} format is registered (known: {sorted(WRITERS)}); "
            "import deltahooks, which registers its interop formats"
        )
    return found
