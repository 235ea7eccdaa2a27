"""Bound how much memory a test may take, so a runaway allocation fails that test by name.

Linux's ``RLIMIT_DATA`` caps the process's writable private memory (heap and anonymous
mappings, which is where tensors live): an allocation past it fails at once with a
``RuntimeError`` / ``MemoryError`` instead of growing until the kernel kills pytest. The
limit is set relative to what the process holds now, so it measures growth.
"""

from __future__ import annotations

import contextlib
import sys

if sys.platform.startswith("linux"):
    import resource
else:  # pragma: no cover - the guard is a no-op where RLIMIT_DATA does not exist
    resource = None


def data_bytes() -> int:
    """The process's writable private memory now (``VmData``), in bytes."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmData line in /proc/self/status")


@contextlib.contextmanager
def growth_limit(extra_bytes: int):
    """Inside the block, the process may take at most ``extra_bytes`` more memory.

    ``with growth_limit(2**30): torch.empty(2**31, dtype=torch.uint8)`` raises
    ``RuntimeError: ... can't allocate memory``. Yields whether the limit is enforced.
    """
    if resource is None:
        yield False
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data_bytes() + extra_bytes
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit, hard))
    try:
        yield True
    finally:
        resource.setrlimit(resource.RLIMIT_DATA, (soft, hard))
