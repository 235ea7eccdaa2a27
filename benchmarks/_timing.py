"""Timing and memory helpers shared by the benchmarks.

Why interleave: on a small shared machine (2 cores, frequency scaling, neighbours)
the speed drifts over a run by more than the few percent we want to resolve. Timing
the contenders alternately, round after round, exposes both to the same drift, and
the median of the per-round ratios cancels most of what is left.
"""

from __future__ import annotations

import datetime
import gc
import os
import resource
import statistics
import subprocess
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import torch

_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def synchronize(device: torch.device) -> None:
    """Wait for queued kernels, so a wall-clock reading covers the work it timed."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call of ``fn`` takes, device work included."""
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def interleave(
    cases: Mapping[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int,
    device: torch.device,
) -> dict[str, list[float]]:
    """Time every case once per round, alternating the order each round (A B, B A, ...).

    Warm-up rounds (allocator, kernel caches, lazy init) run first and are dropped.
    Alternating the order keeps "who runs right after whom" from favouring one side.
    ``gc`` runs between calls, never inside a timed call.
    """
    names = list(cases)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            gc.collect()
            elapsed = time_call(cases[name], device)
            if index >= warmup:
                times[name].append(elapsed)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(numerator: list[float], denominator: list[float]) -> float:
    """Median of per-round ratios: each pair ran back to back, so drift mostly cancels."""
    return statistics.median(n / d for n, d in zip(numerator, denominator, strict=True))


def spread(values: list[float]) -> float:
    """Relative half-range of the middle half (IQR / 2 / median): a noise indicator."""
    if len(values) < 4:
        return (max(values) - min(values)) / 2 / statistics.median(values)
    q1, _, q3 = statistics.quantiles(values, n=4)
    return (q3 - q1) / 2 / statistics.median(values)


def ratio_of_minima(numerator: list[float], denominator: list[float]) -> float:
    """Best time over best time: what each side costs when nothing else disturbed it."""
    return min(numerator) / min(denominator)


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent on anything but idling (Linux /proc/stat)."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    ticks = [int(v) for v in fields]
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest is in user already


class Contention:
    """Share of the machine's CPUs that *other* processes used during a ``with`` block.

    Why: on a shared box the ratio of two timings is only meaningful when the rest
    of the machine was quiet; printing this next to a result says how far to trust it.
    ``share`` is None where /proc/stat is missing.
    """

    def __init__(self) -> None:
        self.share: float | None = None

    def __enter__(self) -> Contention:
        self._busy = _busy_seconds()
        self._own = _own_seconds()
        self._wall = time.perf_counter()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        busy = _busy_seconds()
        if busy is None or self._busy is None:
            return
        wall = time.perf_counter() - self._wall
        foreign = (busy - self._busy) - (_own_seconds() - self._own)
        self.share = max(0.0, foreign / (wall * (os.cpu_count() or 1)))

    def describe(self) -> str:
        if self.share is None:
            return "other processes' CPU use unknown"
        return f"other processes used {self.share * 100:.0f}% of {os.cpu_count()} CPUs"


def _own_seconds() -> float:
    """CPU seconds of this process and its finished children."""
    own = os.times()
    return own.user + own.system + own.children_user + own.children_system


def current_rss_bytes() -> int:
    """Resident set size now (Linux ``VmRSS``; ``ru_maxrss`` elsewhere, a peak)."""
    return _status_field("VmRSS") or peak_rss_bytes()


def peak_rss_bytes() -> int:
    """Peak resident set size since start or the last :func:`reset_peak_rss`."""
    hwm = _status_field("VmHWM")
    if hwm:
        return hwm
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Restart the peak-RSS watermark (Linux >= 4.0); False when that is not possible.

    Lets a measurement exclude the peak of model construction and imports, so it
    reflects only the phase under test.
    """
    try:
        _CLEAR_REFS.write_text("5")
    except OSError:
        return False
    return True


def _status_field(name: str) -> int:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(name + ":"):
                return int(line.split()[1]) * 1024  # "VmHWM:  123 kB"
    except OSError:
        pass
    return 0


def git_commit() -> str:
    """The short commit the benchmark ran on, so a table can be traced to its code."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "no commit"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
