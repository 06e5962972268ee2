"""Walls that keep the threat model honest: who may import whom inside gilib.

The server's side (``gilib.attack``) must never reach the client's data or
truth: it imports neither the data loaders, the metrics (which read the true
text), the client, the experiment drivers nor the results store. And the
package has no import cycle, counting imports inside functions too.
"""

import ast
from pathlib import Path

import pytest

GILIB = Path(__file__).resolve().parent.parent / "gilib"
FORBIDDEN_FOR_ATTACK = {"gilib.data", "gilib.metrics", "gilib.experiments", "gilib.client", "gilib.results",
                        "gilib.span_study", "gilib.utility", "gilib.headlines", "gilib.book",
                        "gilib.federated", "gilib.fl_study"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(GILIB.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(GILIB.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, ast.AST]]:
    """Every gilib module a file imports, anywhere in it (functions included), with the node."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    known = _modules()
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
            # `from . import results` names a module; `from .x import y` names x (or x.y if a module).
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target.startswith("gilib") and target != name:
                found.append((target, node))
    return found


def _graph() -> dict[str, set[str]]:
    graph = {name: set() for name in _modules()}
    for name, path in _modules().items():
        for target, _ in _imports(path):
            # A package's __init__ is imported on the way to any submodule: that edge is implied, not a cycle.
            if not name.startswith(target + "."):
                graph[name].add(target)
    return graph


def test_the_attack_never_imports_the_clients_side():
    offenders = [(name, target) for name, path in _modules().items() if name.startswith("gilib.attack")
                 for target, _ in _imports(path) if target in FORBIDDEN_FOR_ATTACK]
    assert offenders == []


def test_the_wall_test_sees_function_level_imports(tmp_path, monkeypatch):
    """The parser finds an import hidden inside a function, so the two tests above can fail."""
    fake = GILIB / "attack" / "_wall_probe.py"
    fake.write_text("def f():\n    from ..data import load_split  # probe\n    return load_split\n")
    try:
        assert [t for t, _ in _imports(fake)] == ["gilib.data"]
    finally:
        fake.unlink()


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
