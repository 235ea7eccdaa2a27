"""Shared test settings: hypothesis profiles and a per-test memory guard.

CI runs the ``ci`` profile: no wall-clock deadline (busy machines are slow, not wrong), no
example database (every run starts from the same nothing, and a failure prints the
``@reproduce_failure`` blob that replays it anywhere).
"""

import os
import pathlib
import re
import sys
import types

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

HF = ("transformers", "peft", "trl")
HERE = pathlib.Path(__file__).resolve().parent
# a module-level `pytest.importorskip("transformers")` keeps no name in the module's globals
TOP_LEVEL_IMPORT = re.compile(r'^\S.*importorskip\(\s*"(transformers|peft|trl)', re.M)


def _imports_hf(module: types.ModuleType, seen: set[str]) -> bool:
    """Whether ``module`` imports transformers, peft or trl at import time, itself or through
    a helper module of tests/ (``tiny_models``, ``architectures``, ...)."""
    seen.add(module.__name__)
    path = getattr(module, "__file__", None)
    if path and TOP_LEVEL_IMPORT.search(pathlib.Path(path).read_text(encoding="utf-8")):
        return True
    for value in vars(module).values():
        if isinstance(value, types.ModuleType):
            source = value
        else:
            source = sys.modules.get(getattr(value, "__module__", None) or "")
            if source is None:
                continue
        if source.__name__.split(".")[0] in HF:
            return True
        path = getattr(source, "__file__", None)
        if path and source.__name__ not in seen and pathlib.Path(path).resolve().parent == HERE:
            if _imports_hf(source, seen):
                return True
    return False


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "hf: the test's module imports transformers, peft or trl (set automatically); CI runs "
        "these again against the newest releases (`pytest -m hf`)",
    )


def pytest_collection_modifyitems(config, items):
    found: dict[str, bool] = {}
    for item in items:
        module = getattr(item, "module", None)  # None for doctests: deltahooks never imports HF
        if module is None:
            continue
        if module.__name__ not in found:
            found[module.__name__] = _imports_hf(module, set())
        if found[module.__name__]:
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
