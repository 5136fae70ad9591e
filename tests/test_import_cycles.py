"""No two modules of senslora import each other, directly or in a circle.

The graph has one node per module under src/senslora (a package is its ``__init__``) and an edge
for every ``import`` / ``from ... import`` of another senslora module: ``from .pkg import name``
points at ``pkg.name`` when that is a module, else at ``pkg``; ``from senslora import NAME`` at
the module that defines the public name. Imports under ``if TYPE_CHECKING:`` never run and are
left out. Two graphs are checked: the module-level imports (what ``import`` of a module runs), and
every import at any depth, the lazy ones inside functions included (a circle through a function is
a circle as soon as that function runs).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import senslora

PACKAGE = Path(senslora.__file__).parent


def modules(package_dir: Path) -> dict[str, Path]:
    """Dotted module name -> source file, for every module of the package at ``package_dir``."""
    found = {}
    for path in sorted(package_dir.rglob("*.py")):
        rel = path.relative_to(package_dir.parent).with_suffix("")
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    """The import statements of a module, leaving out ``if TYPE_CHECKING:`` bodies; with
    ``module_level``, only those that run when the module is imported (not inside a def or class body's functions)."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.append(child)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for sub in child.orelse:
                    visit_one(sub)
            elif module_level and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            else:
                visit(child)

    def visit_one(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
        else:
            visit(node)

    visit(tree)
    return found


def import_graph(package_dir: Path, *, module_level: bool) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (see the module docstring)."""
    mods = modules(package_dir)
    root = package_dir.name
    exports = getattr(senslora, "_EXPORTS", {}) if root == "senslora" else {}
    graph: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        edges = set()
        for node in _imports(ast.parse(path.read_text(), str(path)), module_level):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = alias.name
                    while target not in mods and "." in target:
                        target = target.rpartition(".")[0]
                    edges.add(target)
                continue
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                if target == root and alias.name in exports:
                    edges.add(f"{root}.{exports[alias.name]}")
                elif f"{target}.{alias.name}" in mods:
                    edges.add(f"{target}.{alias.name}")
                else:
                    edges.add(target)
        graph[name] = (edges & set(mods)) - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle (``[a, b, ..., a]``) per strongly connected group of 2+ modules (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[set[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return [_circle(graph, group) for group in groups]


def _circle(graph: dict[str, set[str]], group: set[str]) -> list[str]:
    """A shortest path from the group's first module back to itself, inside the group."""
    start = min(group)
    paths = {start: [start]}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & group):
                if w == start:
                    return [*paths[v], start]
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    nxt.append(w)
        frontier = nxt
    raise AssertionError("a strongly connected group without a circle")


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level", "any-depth"])
def test_the_package_imports_no_module_in_a_circle(module_level):
    graph = import_graph(PACKAGE, module_level=module_level)
    assert len(graph) > 50 and "senslora.core.checks" in graph["senslora.core.presets"]
    found = cycles(graph)
    assert not found, "import circles: " + "; ".join(" -> ".join(c) for c in found)


def test_the_check_sees_a_circle_through_a_function_and_ignores_type_checking(tmp_path):
    fake = tmp_path / "pkg"
    (fake / "sub").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "sub" / "__init__.py").write_text("from . import a\n")
    (fake / "sub" / "a.py").write_text("from ..b import f\n")
    (fake / "b.py").write_text("def f():\n    from .sub import a\n")
    (fake / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .d import x\n")
    (fake / "d.py").write_text("from .c import y\n")
    assert cycles(import_graph(fake, module_level=True)) == []
    assert cycles(import_graph(fake, module_level=False)) == [["pkg.b", "pkg.sub.a", "pkg.b"]]


def test_the_names_moved_to_break_the_circles_still_import_from_their_old_homes():
    from senslora.core import checks, presets
    from senslora.core.estimators import SINK_MODES
    from senslora.core.estimators.activation import SINK_MODES as activation_sinks
    from senslora.data import examples, formats, schema
    from senslora.data.batches import Example as batches_example
    from senslora.training import methods
    from senslora.training.methods import base

    assert SINK_MODES is activation_sinks is checks.SINK_MODES == ("keep", "drop")
    assert (presets.is_number, presets.one_of, presets.Check) == (checks.is_number, checks.one_of, checks.Check)
    assert examples.Example is formats.Example is batches_example is schema.Example
    assert "Example" in examples.__all__
    assert methods.load_all is base.load_all
    with pytest.raises(senslora.SensloraError, match="--sink must be one of keep, drop, got 'x'"):
        presets.check_value("sink", "x")
