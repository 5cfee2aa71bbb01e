"""The rewriter package has no import cycles, function-level imports included, and keeps its layering: the CLI
imports api only, ops never import kernels, the decode runtime imports no pass and no pass imports it."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "rewriter"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the rewriter modules it imports anywhere in its body (`from . import x` counts as importing x)."""
    files = {module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    base = ".".join(base + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files else base)
            for t in targets:
                if t in files and t != mod:
                    graph[mod].add(t)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_cycles():
    graph = import_graph()
    # the package root imports its parts to register them; nothing imports the root back
    graph["rewriter"] = set()
    cycle = find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_layering():
    graph = import_graph()
    assert graph["rewriter.cli.main"] <= {"rewriter.api", "rewriter.errors"}, graph["rewriter.cli.main"]
    ops = [m for m in graph if m.startswith(("rewriter.attention", "rewriter.linear")) and ".triton" not in m]
    for m in ops:
        assert not any(".triton" in t for t in graph[m]), f"{m} imports a kernel module"
    decode = [m for m in graph if m.startswith("rewriter.decode")]
    passes = [m for m in graph if m.startswith("rewriter.passes")]
    for m in decode:
        assert not any(t.startswith("rewriter.passes") for t in graph[m]), f"{m} imports a pass"
    for m in passes:
        assert not any(t.startswith("rewriter.decode") for t in graph[m]), f"{m} imports the decode runtime"
