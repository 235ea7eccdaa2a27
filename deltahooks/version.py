"""The package version, read from the installed package's metadata.

``pyproject.toml`` is the one place the version is written; the code reads it back here,
at the bottom floor, so that files that record it (delta files, the CLI) need not import
the package's ``__init__``.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("deltahooks")
except PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"
