"""effref's modules import each other without cycles, deferred imports inside functions included.

A cycle hidden behind a function-level import still means that neither module reads without the other; the
package is meant to stand in floors (the lab bench, then the techniques), each reading without those above it.
The graph is read from the source with ``ast``, so nothing is imported here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import effref

PACKAGE = Path(effref.__file__).parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the effref modules it imports (a package's ``__init__`` counts only when named itself)."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from effref.x import y`: y is a submodule when such a file exists, else a name in effref.x
                targets |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in files else node.module
                            for a in node.names}
        graph[name] = {t for t in targets if t in files and t != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}  # "open" while on the current path, "done" once fully explored

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path + [nxt])):
                return cycle
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [start])):
            return cycle
    return None


def test_effref_has_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The lab bench (README, "Layout"): what every technique stands on, so it imports no technique.
LAB_BENCH = ("effref.runtime", "effref.assets", "effref.asset_tools", "effref.asset_builders",
             "effref.models", "effref.data", "effref.eval", "effref.memory", "effref.plotting", "effref.catalog",
             "effref.kernels", "effref.checks")


def on_the_bench(module: str) -> bool:
    return module == "effref" or any(module == b or module.startswith(b + ".") for b in LAB_BENCH)


def test_the_lab_bench_imports_no_technique():
    graph = import_graph()
    upward = {m: sorted(t for t in targets if not on_the_bench(t))
              for m, targets in graph.items() if on_the_bench(m)}
    assert not {m: t for m, t in upward.items() if t}, "the lab bench imports techniques"


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert "effref.quantization.basics" in graph["effref.quantization.linear"]  # edges are really read
    assert "effref.kernels" in graph["effref"]
