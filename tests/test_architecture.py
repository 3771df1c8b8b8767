"""The package's shape: no import cycles (function-level imports included) and no oversized files.

The import graph is read from the source with ``ast`` rather than from ``sys.modules``, so an import hidden inside a
function (the usual way a cycle is papered over) counts like any other. Importing ``a.b.c`` also runs the
``__init__`` of ``a.b``, so that package is an edge too, except from inside it; the root package ``hmerzoo`` is left
out because its ``__init__`` only re-exports the public API. A package ``__init__`` that loads all its modules with
``pkgutil`` (the registries' auto-discovery) is taken to import each of them.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hmerzoo"
ROOT = "hmerzoo"
MAX_LINES = 450


def module_name(path: Path, package: Path) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def imported_names(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """Every hmerzoo module that ``name`` imports anywhere in its body."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == ROOT)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[:len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            if base.split(".")[0] != ROOT:
                continue
            for alias in node.names:  # `from pkg import submodule` imports the submodule
                candidate = f"{base}.{alias.name}"
                found.add(candidate if candidate in modules else base)
    if path.name == "__init__.py" and "pkgutil.iter_modules" in path.read_text(encoding="utf-8"):
        found.update(m for m in modules if m.rpartition(".")[0] == name)
    edges = set()
    for target in found:
        while target not in modules and "." in target:  # `import hmerzoo.x.attr`-style leftovers
            target = target.rpartition(".")[0]
        if target == name or target not in modules:
            continue
        edges.add(target)
        parent = target.rpartition(".")[0]
        while parent and parent != ROOT:  # importing a.b.c runs a.b's __init__ first
            if not (name == parent or name.startswith(parent + ".")):
                edges.add(parent)
            parent = parent.rpartition(".")[0]
    return edges


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    modules = all_modules(package)
    return {name: imported_names(name, path, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    found: list[list[str]] = []
    counter = 0
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = counter
        counter += 1
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def test_cycle_finder_finds_a_planted_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_function_level_imports_are_edges(tmp_path):
    pkg = tmp_path / ROOT
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "top.py").write_text("def f():\n    from .sub import low\n")
    (pkg / "sub" / "low.py").write_text("from ..top import f\n")
    assert cycles(import_graph(pkg)) == [["hmerzoo.sub.low", "hmerzoo.top"]]
    (pkg / "top.py").write_text("def f():\n    return 1\n")
    assert cycles(import_graph(pkg)) == []


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles in hmerzoo (function-level imports included):\n" + "\n".join(
        " <-> ".join(c) for c in found)


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_file_size(path):
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines (limit {MAX_LINES}): split it"
