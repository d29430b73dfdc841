"""The package's import graph has no cycle: every `import` of an ablate module counts, those
made on demand inside a function too (they hide a cycle, not remove it), and importing
`ablate.tasks.base` imports its parent package `ablate.tasks` (its `__init__`) first."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_imports(root: Path) -> dict[str, set[str]]:
    """ablate module -> the ablate modules it imports anywhere in its text."""
    graph = {}
    for path in sorted((root / "ablate").rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.ImportFrom)
                and node.module
                and node.module.startswith("ablate")
            ):
                edges.add(node.module)
                # `from ablate import data` imports the module ablate.data
                edges.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                edges.update(a.name for a in node.names if a.name.startswith("ablate"))
        graph[name] = edges
    return {m: with_parents(edges, graph, m) for m, edges in graph.items()}


def with_parents(edges: set[str], graph: dict, module: str) -> set[str]:
    """`edges` plus the parent packages they run first; a parent package of `module` itself
    is already being imported when `module` runs, so only an explicit import of it counts."""
    own = {".".join(module.split(".")[:n]) for n in range(1, module.count(".") + 2)}
    implied = set()
    for e in edges:
        parts = e.split(".")
        implied.update(".".join(parts[:n]) for n in range(2, len(parts)))
    return {e for e in edges | (implied - own) if e in graph and e != module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of `graph` as a path of modules, or None."""
    state: dict[str, str] = {}

    def visit(module, path):
        state[module] = "open"
        for other in sorted(graph[module]):
            if state.get(other) == "open":
                return [*path, other]
            if other not in state and (cycle := visit(other, [*path, other])):
                return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module, [module])):
            return cycle
    return None


def test_no_import_cycle():
    graph = module_imports(ROOT)
    assert (
        "ablate.data" in graph["ablate.tasks.text"] and "ablate.tasks.text" in graph["ablate.tasks"]
    )
    assert not {m for m in graph["ablate.data"] if m.startswith("ablate.tasks")}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))
    # The check can fail: one import of the tasks' base by data (as the old layout had) closes
    # a cycle through the tasks package's __init__, which imports the text tasks, which import
    # data.
    data_back = with_parents({"ablate.tasks.base"}, graph, "ablate.data")
    assert find_cycle({**graph, "ablate.data": graph["ablate.data"] | data_back})
