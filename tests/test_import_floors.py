"""The package's floors, read from its source: no import circle between deltahooks modules,
and no import hidden inside a function except of an optional dependency.

A module stands above everything it imports, so the floors read bottom-up (errors, ledger,
... spec, methods, planning, delta, attach, io/interop, cli). An import inside a function
is how a circle hides; the only ones allowed are of packages a user may not have installed
(transformers, peft, ...), loaded when the feature that needs them runs.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "deltahooks"

OPTIONAL = {  # module (or a parent of it) -> why it may be imported inside a function
    "transformers": "the hf extra: checkpoints, the demo, the Trainer callback",
    "peft": "only to compare with or hand adapters to PEFT",
    "accelerate": "optional launcher",
    "bitsandbytes": "optional quantized layers",
    "torchao": "optional quantized layers",
    "trl": "optional trainers",
    "tqdm": "the demo extra",
    "torch.distributed": "absent from torch builds without distributed, and slow to import",
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def imported(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The absolute names an import statement of ``module`` loads (a ``from . import x`` of
    a submodule names the submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level == 0:
        base = node.module or ""
    else:
        package = module.split(".")
        if MODULES[module].name != "__init__.py":
            package = package[:-1]
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([node.module] if node.module else [])])
    return [
        f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
        for alias in node.names
    ]


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Ids of the nodes under ``if TYPE_CHECKING:`` (those imports never run)."""
    return {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
        for statement in block.body
        for node in ast.walk(statement)
    }


def _inside_functions(tree: ast.Module) -> set[int]:
    return {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if node is not function
    }


def scan() -> tuple[dict[str, set[str]], list[str]]:
    """``({module: deltahooks modules it imports at module level}, [imports in functions
    that are not allowed, as "module:line imports name"])``."""
    edges: dict[str, set[str]] = {module: set() for module in MODULES}
    hidden = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        typing_only, in_function = _type_checking_only(tree), _inside_functions(tree)
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)) or id(node) in typing_only:
                continue
            names = imported(module, node)
            if id(node) in in_function:
                hidden += [
                    f"{module}:{node.lineno} imports {name}"
                    for name in names
                    if not any(name == ok or name.startswith(ok + ".") for ok in OPTIONAL)
                ]
            else:
                edges[module] |= {name for name in names if name in MODULES and name != module}
    return edges, hidden


def find_circle(edges: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports as ``[a, b, ..., a]``, or None (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the path, "done" once every import is seen
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(edges[module]):
            if state.get(target) == "open":
                return [*path[path.index(target) :], target]
            if target not in state:
                found = visit(target)
                if found:
                    return found
        path.pop()
        state[module] = "done"
        return None

    for module in sorted(edges):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return None


def test_the_scan_sees_the_package():
    edges, _ = scan()
    assert "deltahooks.delta" in edges and "deltahooks.planning" in edges["deltahooks.delta"]
    assert "deltahooks.errors" in edges["deltahooks.registry"]


def test_no_import_circle_between_deltahooks_modules():
    circle = find_circle(scan()[0])
    assert circle is None, "import circle: " + " -> ".join(circle)


def test_no_import_inside_a_function_but_of_optional_dependencies():
    hidden = scan()[1]
    assert not hidden, (
        "imports inside functions (move them to the top of the module; only optional "
        f"dependencies {sorted(OPTIONAL)} may be imported late):\n" + "\n".join(hidden)
    )


def test_the_checks_catch_what_they_guard_against():
    assert find_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_circle({"a": {"b"}, "b": set()}) is None
    tree = ast.parse(
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from .delta import Delta\n"
        "def f():\n    from ...attach import attach\n    import transformers\n"
        "from . import lora_parameters as parameters\n"
    )
    guarded, in_function = _type_checking_only(tree), _inside_functions(tree)
    imports = sorted(
        (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))),
        key=lambda node: node.lineno,
    )
    assert [id(n) in guarded for n in imports] == [False, True, False, False, False]
    assert [id(n) in in_function for n in imports] == [False, False, True, True, False]
    lora = "deltahooks.interop.peft.lora"
    assert imported(lora, imports[2]) == ["deltahooks.attach"]
    assert imported(lora, imports[4]) == ["deltahooks.interop.peft.lora_parameters"]
    assert imported("deltahooks.interop.peft", imports[4]) == [
        "deltahooks.interop.peft.lora_parameters"
    ]


def test_late_imports_are_only_of_packages_deltahooks_does_not_require():
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((PACKAGE.parent / "pyproject.toml").read_text())["project"]
    required = {re.match(r"[\w.-]+", dependency)[0] for dependency in project["dependencies"]}
    assert required >= {"torch", "safetensors"}
    assert not required & {name.split(".")[0] for name in OPTIONAL if name != "torch.distributed"}
