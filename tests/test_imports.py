"""The package's import graph, read from the source with `ast`: no cycles between modules or
between packages, and no module reaching for another module's private (`_x`) names.

Imports are collected wherever they are written (module level, inside functions, under `if`),
relative and absolute; `from . import x` counts as importing the submodule `x` when there is
one, else the package itself. Imports under `if TYPE_CHECKING:` never run, so they make no
cycle; they may still not take private names. Nothing is imported to build the graph.
"""

from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "musicsteer"
PACKAGE = ROOT.name


def module_name(path: Path) -> str:
    parts = (PACKAGE, *path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(ROOT.rglob("*.py"))}


def is_package(name: str) -> bool:
    return MODULES[name].name == "__init__.py"


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass(frozen=True)
class Import:
    source: str  # the importing module
    target: str  # the module of the package it names
    line: int
    private: str | None = None  # a private name taken from `target`, if any


def _base(module: str, level: int) -> str:
    """The package `from .{level}` is relative to, inside `module`."""
    parts = module.split(".")
    if not is_package(module):
        parts = parts[:-1]
    return ".".join(parts[:len(parts) - (level - 1)])


def _resolve(name: str) -> str | None:
    """The package module `name` is, or the nearest package module above it."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _runtime_nodes(node: ast.AST):
    """Every node below `node`, except those under `if TYPE_CHECKING:` (never run)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.If) and _is_type_checking(child.test):
            for other in child.orelse:
                yield other
                yield from _runtime_nodes(other)
            continue
        yield child
        yield from _runtime_nodes(child)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, typing_too: bool = False) -> list[Import]:
    """The imports `module` runs; with `typing_too`, also those only type checkers read."""
    tree = ast.parse(MODULES[module].read_text(), filename=str(MODULES[module]))
    nodes = list(ast.walk(tree) if typing_too else _runtime_nodes(tree))
    found: list[Import] = []
    aliases: dict[str, str] = {}  # local name -> package module it is bound to
    for node in nodes:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE and (target := _resolve(alias.name)):
                    found.append(Import(module, target, node.lineno))
                    if alias.asname:
                        aliases[alias.asname] = target
        elif isinstance(node, ast.ImportFrom):
            origin = node.module or ""
            if node.level:
                origin = ".".join(filter(None, (_base(module, node.level), origin)))
            if origin.split(".")[0] != PACKAGE or not (target := _resolve(origin)):
                continue
            for alias in node.names:
                sub = f"{origin}.{alias.name}"
                if sub in MODULES:  # `from . import x` with x a submodule
                    found.append(Import(module, sub, node.lineno, alias.name if is_private(alias.name) else None))
                    aliases[alias.asname or alias.name] = sub
                else:
                    found.append(Import(module, target, node.lineno, alias.name if is_private(alias.name) else None))
    for node in nodes:  # `mod._x` on a module bound by an import above
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                and is_private(node.attr):
            found.append(Import(module, aliases[node.value.id], node.lineno, node.attr))
    return found


ALL_IMPORTS = [imp for name in MODULES for imp in imports_of(name)]
TYPING_TOO = [imp for name in MODULES for imp in imports_of(name, typing_too=True)]


def module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {name: set() for name in MODULES}
    for imp in ALL_IMPORTS:
        if imp.target != imp.source:
            graph[imp.source].add(imp.target)
    return graph


def package_of(module: str) -> str:
    """The package a module lives in; modules at the top of the package stand for themselves."""
    if is_package(module):
        return module
    parent = module.rpartition(".")[0]
    return module if parent == PACKAGE else parent


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for source, targets in module_graph().items():
        edges = graph.setdefault(package_of(source), set())
        edges.update(package_of(t) for t in targets if package_of(t) != package_of(source))
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle path per strongly connected component with more than one node (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [_path_in(graph, c) for c in components]


def _path_in(graph: dict[str, set[str]], component: set[str]) -> list[str]:
    """A shortest cycle through the component's first node, as start -> ... -> start."""
    start = min(component)
    parents: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v] & component):
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(parents[path[-1]])
                    return [start, *reversed(path[:-1]), start] if len(path) > 1 else [start, v, start]
                if w not in parents:
                    parents[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle in component {component}")


def _where(path: list[str], node=lambda module: module) -> str:
    """The import statements behind each edge of a cycle, as `module:line -> module`."""
    edges = []
    for a, b in zip(path, path[1:]):
        found = sorted({f"{i.source}:{i.line} -> {i.target}" for i in ALL_IMPORTS
                        if node(i.source) == a and node(i.target) == b})
        edges.append(", ".join(found))
    return "\n    ".join(edges)


def test_the_graph_sees_the_package():
    assert {"musicsteer.cli", "musicsteer.model.loading.load", "musicsteer.errors"} <= set(MODULES)
    graph = module_graph()
    assert "musicsteer.errors" in graph["musicsteer.model.loading.load"]
    assert "musicsteer.model.loading.load" in graph["musicsteer.cli.common"]  # a function-level import


def test_type_checking_imports_are_not_edges():
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import a\nelse:\n    import b\n")
    names = [alias.name for node in _runtime_nodes(tree) if isinstance(node, ast.Import) for alias in node.names]
    assert names == ["b"]


def test_cycle_finder_reports_the_path():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c", "a"]]


def test_no_module_cycles():
    found = cycles(module_graph())
    assert not found, "import cycles between modules:\n" + "\n".join(
        " -> ".join(c) + f"\n    {_where(c)}" for c in found)


def test_no_package_cycles():
    found = cycles(package_graph())
    assert not found, "import cycles between packages:\n" + "\n".join(
        " -> ".join(c) + f"\n    {_where(c, package_of)}" for c in found)


def test_no_private_names_across_modules():
    bad = sorted({f"{MODULES[i.source].relative_to(ROOT.parent)}:{i.line}: {i.private} from {i.target}"
                  for i in TYPING_TOO if i.private and i.target != i.source})
    assert not bad, "private names used outside their module:\n" + "\n".join(bad)
