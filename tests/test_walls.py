"""Walls that keep the threat model and the layers honest: who may import whom inside gilib.

An allow-list, counting imports inside functions too:

* the server's side (``gilib.attack``) imports only itself, the selection
  and the message (``gilib.selection``, ``gilib.update``) and the victim
  (``gilib.models``): never the data, the client, the metrics (which read
  the true text), the studies or the book;
* the library (the modules at the top of ``gilib``) never imports the
  studies or the book;
* the studies never import the book; the book may import anything;
* there is no import cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

GILIB = Path(__file__).resolve().parent.parent / "gilib"

ATTACK_MAY_IMPORT = ("gilib.attack", "gilib.selection", "gilib.update", "gilib.models")
"""Everything the attack may import (a module or a package and its submodules)."""
LIBRARY_MAY_NOT = ("gilib.studies", "gilib.book")
STUDIES_MAY_NOT = ("gilib.book",)


def _module_name(path: Path, root: Path = GILIB) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(root: Path = GILIB) -> dict[str, Path]:
    return {_module_name(p, root): p for p in sorted(root.rglob("*.py"))}


def _imports(path: Path, root: Path = GILIB) -> list[tuple[str, ast.AST]]:
    """Every module of the package at ``root`` that a file imports, anywhere in it (functions included)."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = _modules(root)
    top = root.name
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from . import runner` names a module; `from .x import y` names x (or x.y if a module).
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith(top) and target != name:
                found.append((target, node))
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _layer(name: str) -> str:
    for layer in ("gilib.attack", "gilib.studies", "gilib.book"):
        if _within(name, (layer,)):
            return layer
    return "library"


def _graph() -> dict[str, set[str]]:
    graph = {name: set() for name in _modules()}
    for name, path in _modules().items():
        for target, _ in _imports(path):
            # A package's __init__ is imported on the way to any submodule: that edge is implied, not a cycle.
            if not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def _offenders(layer: str) -> list[tuple[str, str]]:
    return [(name, target) for name, targets in _graph().items() if _layer(name) == layer for target in targets
            if not _allowed(layer, target)]


def _allowed(layer: str, target: str) -> bool:
    if layer == "gilib.attack":
        return _within(target, ATTACK_MAY_IMPORT)
    if layer == "library":
        return target == "gilib" or not _within(target, LIBRARY_MAY_NOT)
    if layer == "gilib.studies":
        return not _within(target, STUDIES_MAY_NOT)
    return True


def test_the_layers_are_where_the_package_says():
    layers = {_layer(name) for name in _modules()}
    assert layers == {"library", "gilib.attack", "gilib.studies", "gilib.book"}
    library = sorted(n for n in _modules() if _layer(n) == "library")
    assert library == ["gilib", "gilib.client", "gilib.data", "gilib.dp", "gilib.federated", "gilib.finetune",
                       "gilib.finetune.__main__", "gilib.lora", "gilib.metrics", "gilib.models", "gilib.secure",
                       "gilib.selection", "gilib.update"]


def test_the_attack_imports_only_the_selection_the_message_and_the_model():
    assert _offenders("gilib.attack") == []


def test_the_library_never_imports_the_studies_or_the_book():
    assert _offenders("library") == []


def test_the_studies_never_import_the_book():
    assert _offenders("gilib.studies") == []


@pytest.mark.parametrize("layer, target, allowed", [
    ("gilib.attack", "gilib.data", False), ("gilib.attack", "gilib.client", False),
    ("gilib.attack", "gilib.metrics", False), ("gilib.attack", "gilib.studies.runner", False),
    ("gilib.attack", "gilib.update", True), ("gilib.attack", "gilib.attack.rowspace", True),
    ("library", "gilib.studies.store", False), ("library", "gilib.book", False), ("library", "gilib.dp", True),
    ("gilib.studies", "gilib.book.plots", False), ("gilib.studies", "gilib.attack", True),
    ("gilib.book", "gilib.studies.grids", True),
])
def test_the_allow_list_refuses_what_it_should(layer, target, allowed):
    assert _allowed(layer, target) is allowed


def test_the_wall_test_sees_function_level_imports(tmp_path):
    """The parser finds an import hidden inside a function, so the tests above can fail.

    The probe is a package of its own in a temporary folder: nothing is
    written into the source tree.
    """
    root = tmp_path / "gilib"
    (root / "attack").mkdir(parents=True)
    for init in (root / "__init__.py", root / "attack" / "__init__.py", root / "data.py"):
        init.write_text("")
    probe = root / "attack" / "probe.py"
    probe.write_text("def f():\n    from ..data import load_split  # probe\n    return load_split\n")
    assert [t for t, _ in _imports(probe, root)] == ["gilib.data"]
    assert not _allowed(_layer(_module_name(probe, root)), "gilib.data")


def test_no_import_cycle_in_gilib():
    graph, state, cycles = _graph(), {}, []

    def visit(node, trail):
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                cycles.append(trail[trail.index(target):] + [target])
            elif target not in state:
                visit(target, trail + [target])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


@pytest.mark.parametrize("name", sorted(_modules()))
def test_imports_inside_functions_state_their_reason(name):
    """Imports belong at the top of a module; one inside a function carries a comment saying why."""
    path = _modules()[name]
    lines = path.read_text().splitlines()
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body if isinstance(node, (ast.Import, ast.ImportFrom))}
    guarded = {id(n) for stmt in tree.body if isinstance(stmt, (ast.If, ast.Try))
               for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    silent = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top | guarded:
            nearby = lines[max(0, node.lineno - 3): node.end_lineno + 1]
            if not any("#" in line for line in nearby):
                silent.append(f"{path.name}:{node.lineno}: {lines[node.lineno - 1].strip()}")
    assert silent == []
