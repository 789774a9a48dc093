"""The package's layout, read from its source with ``ast`` (nothing imported, no torch): the
imports run one way, library <- study application <- tools and experiments, and no module or
function outgrows the limits that keep each one readable (docs/architecture.md, "Layout")."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "lossy_hooks"
MODULES = sorted(PACKAGE.rglob("*.py"))

# the layers, by the package's first-level folder; every other module is the library
LAYER_OF_FOLDER = {"study": "study", "tools": "tools", "experiments": "experiments"}
# what each layer may import: the library nothing above it; tools and experiments not each other
ALLOWED = {
    "library": {"library"},
    "study": {"library", "study"},
    "tools": {"library", "study", "tools"},
    "experiments": {"library", "study", "experiments"},
}
MAX_MODULE_LINES = 450  # a module has fewer lines than this
MAX_FUNCTION_LINES = 80  # a function (decorators, signature, docstring and body) has fewer


def dotted(path: Path) -> str:
    """``lossy_hooks/core/state.py`` -> ``lossy_hooks.core.state`` (a package: its folder's name)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> str:
    """The layer of a module of the package (``lossy_hooks.x.y``)."""
    parts = module.split(".")
    return LAYER_OF_FOLDER.get(parts[1], "library") if len(parts) > 1 else "library"


def imported(source: str, module: str, is_package: bool = False) -> list[tuple[int, str]]:
    """``(line, module)`` for every module of the package that the source of ``module``
    imports, anywhere in it (at the top, inside a function, under ``TYPE_CHECKING``, or
    ``importlib.import_module`` of a literal name). ``from lossy_hooks import x`` counts as
    importing ``lossy_hooks.x``."""
    package = module if is_package else module.rpartition(".")[0]
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's own package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            out += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            out.append((node.lineno, node.args[0].value))
    return [(line, name) for line, name in out if name == "lossy_hooks" or name.startswith("lossy_hooks.")]


def imported_by(path: Path) -> list[tuple[int, str]]:
    """:func:`imported` of a module of the package."""
    return imported(path.read_text(encoding="utf-8"), dotted(path), path.name == "__init__.py")


def test_the_layers_are_where_the_layout_says():
    """A guard on the test itself: each layer has modules, and the names it reads are real."""
    found = {layer(dotted(p)) for p in MODULES}
    assert found == set(ALLOWED)
    assert layer("lossy_hooks.study.sweeping.launch") == "study"
    assert layer("lossy_hooks.core.netclock") == layer("lossy_hooks.hook") == "library"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_run_one_way(path):
    """The library (core, loss_models, integrations, the hook and FSDP) imports no study, tool
    or experiment; the study application no tool or experiment; a tool no experiment and an
    experiment no tool."""
    own = layer(dotted(path))
    wrong = [
        f"line {line}: {name} ({layer(name)})"
        for line, name in imported_by(path)
        if layer(name) not in ALLOWED[own]
    ]
    assert not wrong, f"{path.name} is {own} and imports " + "; ".join(wrong)


def test_the_import_reader_sees_every_kind_of_import():
    """The reader above on a made-up tool: plain, from, relative, lazy and by name."""
    source = (
        "import lossy_hooks.experiments.lm_study\n"
        "import numpy\n"
        "from lossy_hooks import study\n"
        "from ..experiments import time_study\n"
        "from . import compare\n"
        "def f():\n"
        "    from lossy_hooks.core import state\n"
        "    return importlib.import_module('lossy_hooks.experiments.x')\n"
    )
    names = [name for _, name in imported(source, "lossy_hooks.tools.probe")]
    assert sorted(names) == [
        "lossy_hooks.core.state",
        "lossy_hooks.experiments.lm_study",
        "lossy_hooks.experiments.time_study",
        "lossy_hooks.experiments.x",
        "lossy_hooks.study",
        "lossy_hooks.tools.compare",
    ]
    assert [layer(n) for n in sorted(names)] == ["library", *["experiments"] * 3, "study", "tools"]


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_modules_and_functions_stay_small(path):
    """Every module under lossy_hooks/ has fewer than MAX_MODULE_LINES lines and every
    function or method (nested ones too) fewer than MAX_FUNCTION_LINES, from its first
    decorator to its last line."""
    source = path.read_text(encoding="utf-8")
    lines = len(source.splitlines())
    assert lines < MAX_MODULE_LINES, f"{path.name} has {lines} lines (limit: under {MAX_MODULE_LINES})"
    long = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            length = node.end_lineno - first + 1
            if length >= MAX_FUNCTION_LINES:
                long.append(f"{node.name} (line {node.lineno}): {length} lines")
    assert not long, f"{path.name}: functions of {MAX_FUNCTION_LINES} lines or more: " + "; ".join(long)
