"""The benchmark scripts use names that their shared modules still define.

The scripts are not run in CI (they time things), so a refactor of the shared harness can
break one silently: ``qlora_vs_peft.py`` crashed on ``common.device_name`` after the
harness moved. This reads every script and checks each ``alias.name`` it takes from a
sibling module (``import lora_vs_peft as common``) against that module.
"""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(BENCHMARKS.glob("*.py"))


def sibling_uses(script: Path) -> dict[str, set[str]]:
    """``{sibling module: names read from it}`` through ``import sibling as alias``."""
    tree = ast.parse(script.read_text())
    siblings = {p.stem for p in SCRIPTS}
    aliases = {
        alias.asname or alias.name: alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name in siblings
    }
    uses: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in aliases
        ):
            uses.setdefault(aliases[node.value.id], set()).add(node.attr)
    for node in ast.walk(tree):  # from sibling import a, b
        if isinstance(node, ast.ImportFrom) and node.module in siblings:
            uses.setdefault(node.module, set()).update(a.name for a in node.names)
    return uses


@pytest.fixture(scope="module")
def import_sibling():
    pytest.importorskip("transformers")
    sys.path.insert(0, str(BENCHMARKS))
    try:
        yield importlib.import_module
    finally:
        sys.path.remove(str(BENCHMARKS))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_name_a_script_takes_from_a_sibling_exists(script, import_sibling):
    for module_name, names in sibling_uses(script).items():
        module = import_sibling(module_name)
        missing = sorted(name for name in names if not hasattr(module, name))
        assert not missing, f"{script.name} uses {module_name}.{missing}, which it lacks"


def test_the_check_sees_the_uses():
    """It would have caught the qlora crash: the names are found at all."""
    uses = sibling_uses(BENCHMARKS / "qlora_vs_peft.py")
    assert {"train_fn", "build_base"} <= uses["lora_vs_peft"]
    assert {"device_name", "markdown_table"} <= uses["_method_vs_peft"]
