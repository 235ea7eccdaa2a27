"""The benchmarks are wired: every name a module takes from another one exists, and every
row of the table of methods builds its spec and PEFT's config.

The benchmarks are not run in CI (they time things), so a refactor of the shared harness can
break one silently: the QLoRA benchmark once crashed on ``common.device_name`` after the
harness moved. This reads every module of the ``benchmarks`` package and checks each name it
imports from a sibling (``from .harness import timed_phase``, ``from . import qlora`` then
``qlora.load_nf4``) against that sibling, and builds each row's spec and config with the
command line's defaults (no model, no timing).
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"
MODULES = sorted(BENCHMARKS.rglob("*.py"))


def package_of(path: Path) -> str:
    """``benchmarks/quality/train.py`` -> ``benchmarks.quality``."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts if path.name == "__init__.py" else parts[:-1])


def absolute(node: ast.ImportFrom, package: str) -> str | None:
    """The module an ``ImportFrom`` reads, absolute; None if outside the package."""
    if node.level:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join([*base, node.module] if node.module else base)
    if node.module and node.module.split(".")[0] == "benchmarks":
        return node.module
    return None


def sibling_uses(path: Path) -> dict[str, set[str]]:
    """``{module: names read from it}``: ``from module import a``, ``module.a`` through
    ``from package import module [as alias]`` or ``import benchmarks.module as alias``."""
    tree = ast.parse(path.read_text())
    package = package_of(path)
    aliases: dict[str, str] = {}
    uses: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("benchmarks."):
                    aliases[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, package)
            if module is None:
                continue
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                where = ROOT.joinpath(*submodule.split("."))
                if where.with_suffix(".py").exists() or where.is_dir():
                    aliases[alias.asname or alias.name] = submodule
                else:
                    uses.setdefault(module, set()).add(alias.name)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            uses.setdefault(aliases[node.value.id], set()).add(node.attr)
    return uses


@pytest.fixture(scope="module")
def import_module():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    sys.path.insert(0, str(ROOT))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(ROOT))


@pytest.mark.parametrize("module", MODULES, ids=lambda p: str(p.relative_to(BENCHMARKS)))
def test_every_name_a_module_takes_from_a_sibling_exists(module, import_module):
    for module_name, names in sibling_uses(module).items():
        sibling = import_module(module_name)
        missing = sorted(name for name in names if not hasattr(sibling, name))
        assert not missing, f"{module.name} uses {module_name}.{missing}, which it lacks"


def test_the_check_sees_the_uses(import_module):
    """It would have caught the QLoRA crash: the names are found at all."""
    uses = sibling_uses(BENCHMARKS / "qlora.py")
    assert {"measure_memory", "timed_phase"} <= uses["benchmarks.harness"]
    assert {"device_name", "Figure"} <= uses["benchmarks.report"]
    assert {"utc_now", "git_commit"} <= uses["benchmarks._timing"]


def test_every_row_builds_its_spec_and_peft_config(import_module):
    """Each row of the table, with the command line's defaults and each file's shapes:
    our spec validates its hyperparameters, PEFT's config is one PEFT accepts."""
    import deltahooks as dh

    cli = import_module("benchmarks.__main__")
    methods = import_module("benchmarks.methods")
    parse = cli.parser()
    args = parse.parse_args(["--method", "all"])
    assert cli.selected(args.method, parse) == list(methods.METHODS)
    for benchmark in methods.BENCHMARKS:
        row_args = cli.for_benchmark(benchmark, list(benchmark.methods), args, parse)
        for method in benchmark.methods:
            assert isinstance(method.spec(row_args), dh.DeltaSpec), method.name
            assert type(method.peft_config(row_args)).__name__.endswith("Config"), method.name


def test_quality_modules_are_seen(import_module):
    """The quality package's modules read each other's names too (``from .train import ...``)."""
    uses = sibling_uses(BENCHMARKS / "quality" / "report.py")
    assert {"Runs", "epochs_for"} <= uses["benchmarks.quality.train"]
    assert "utc_now" in uses["benchmarks._timing"]


def test_every_result_file_comes_from_a_row(import_module):
    """``results/<file>.md`` of a comparison is written by a benchmark of the table."""
    methods = import_module("benchmarks.methods")
    files = {b.file for b in methods.BENCHMARKS}
    written = {p.stem for p in (BENCHMARKS / "results").glob("*_vs_peft.md")}
    assert written <= files, sorted(written - files)
    assert len(files) == len(methods.BENCHMARKS)
