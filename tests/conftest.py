"""Shared test settings: hypothesis profiles and a per-test memory guard.

CI runs the ``ci`` profile: no wall-clock deadline (busy machines are slow, not wrong), no
example database (every run starts from the same nothing, and a failure prints the
``@reproduce_failure`` blob that replays it anywhere).
"""

import functools
import os
import pathlib
import re
import sys

import pytest
from hypothesis import HealthCheck, settings

sys.path.insert(0, os.path.dirname(__file__))

from memory_limits import growth_limit

COMMON = {
    "deadline": None,
    "database": None,
    "print_blob": True,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large],
}
settings.register_profile("ci", max_examples=40, **COMMON)
settings.register_profile("thorough", max_examples=500, **COMMON)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

HF_WORDS = re.compile(r"\b(transformers|peft|trl)\b")
HERE = pathlib.Path(__file__).parent


@functools.cache
def _touches_hf(path: pathlib.Path) -> bool:
    """Whether a test file names transformers, peft or trl, or imports a helper of tests/
    that does (``tiny_models``, ``architectures``, ...)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return False
    if HF_WORDS.search(text):
        return True
    for helper in HERE.glob("*.py"):
        if helper != path and re.search(rf"\b(from|import) {helper.stem}\b", text):
            if _touches_hf(helper):
                return True
    return False


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "hf: the test's module touches transformers, peft or trl (set automatically); CI runs "
        "these again against the newest releases (`pytest -m hf`)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _touches_hf(pathlib.Path(str(item.path))):
            item.add_marker(pytest.mark.hf)


TEST_MEMORY_BUDGET = int(os.environ.get("DELTAHOOKS_TEST_MEMORY_BUDGET", 2 * 2**30))
"""How much memory one test may grow by before its allocations fail (default 2 GiB)."""


@pytest.fixture(autouse=True)
def memory_guard():
    """A test that grows memory past the budget fails with its own name, not the machine."""
    with growth_limit(TEST_MEMORY_BUDGET):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.failed and call.excinfo is not None:
        text = str(call.excinfo.value)
        if call.excinfo.errisinstance(MemoryError) or "can't allocate memory" in text:
            report.sections.append(
                (
                    "memory guard",
                    f"{item.nodeid} tried to grow memory past the per-test budget of "
                    f"{TEST_MEMORY_BUDGET / 2**30:.1f} GiB (DELTAHOOKS_TEST_MEMORY_BUDGET)",
                )
            )
    return report
