"""The shape of the core (DESIGN section 11): no import cycle, no import hidden in a function,
no file over 400 lines, no function over 60, no class over 350 (the files' 400 lines bound the manager too)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
CORE = ROOT / "checkpointer"
SOURCES = sorted(CORE.glob("*.py")) + sorted((ROOT / "adapters").glob("*.py"))


def _imported(node: ast.AST, module: str) -> list[str]:
    """Core modules that an import statement in ``checkpointer.<module>`` names."""
    if isinstance(node, ast.ImportFrom):
        if node.level == 1:
            base = node.module
            return [base] if base else [a.name for a in node.names]
        if node.module and node.module.startswith("checkpointer."):
            return [node.module.split(".")[1]]
        if node.module == "checkpointer":
            return [a.name for a in node.names]
    if isinstance(node, ast.Import):
        return [a.name.split(".")[1] for a in node.names if a.name.startswith("checkpointer.")]
    return []


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in CORE.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        graph[path.stem] = {m for node in tree.body for m in _imported(node, path.stem)
                            if m in modules and m != path.stem}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_core_has_no_import_cycle() -> None:
    graph = _graph()
    assert len(graph) > 20 and graph["manager"]  # the graph was really built
    assert _cycle(graph) is None, " -> ".join(_cycle(graph) or [])


def test_no_core_import_inside_a_function() -> None:
    hidden = []
    for path in CORE.glob("*.py"):
        tree = ast.parse(path.read_text())
        top = set(map(id, tree.body))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in top \
                    and _imported(node, path.stem):
                hidden.append(f"{path.name}:{node.lineno}")
    assert not hidden, f"function-level imports of core modules: {hidden}"


def test_cycle_detection_finds_a_cycle() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_files_and_functions_stay_small(path: Path) -> None:
    text = path.read_text()
    lines = len(text.splitlines())
    assert lines <= 400, f"{path.name}: {lines} lines"
    for node in ast.walk(ast.parse(text)):
        n = (getattr(node, "end_lineno", None) or 0) - getattr(node, "lineno", 0) + 1
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert n <= 60, f"{path.name}:{node.lineno} {node.name} has {n} lines"
        if isinstance(node, ast.ClassDef):
            assert n <= 350, f"{path.name}:{node.lineno} class {node.name} has {n} lines"
