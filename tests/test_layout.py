"""The package layout the design promises (docs/architecture.md): imports go one way, CLI -> driver ->
stages -> cluster/pools -> actors, with no circles, and the worker package never imports the driver's."""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGES = ("orchestrator", "actors")


def import_graph() -> dict[str, set[str]]:
    """Module -> the odpo modules it imports, at module level or inside functions (a lazy import is an edge too)."""
    graph: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((Path(REPO) / package).glob("*.py")):
            name = f"{package}.{path.stem}"
            deps: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] in PACKAGES:
                    if node.module in PACKAGES:  # `from orchestrator import evaluation`
                        deps |= {f"{node.module}.{a.name}" for a in node.names}
                    else:
                        deps.add(node.module)
                elif isinstance(node, ast.Import):
                    deps |= {a.name for a in node.names if a.name.split(".")[0] in PACKAGES}
            graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep in graph and dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_import_circles():
    graph = import_graph()
    assert "orchestrator.driver" in graph and "actors.learner" in graph
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_actors_never_import_the_driver_side():
    upward = {m: sorted(d for d in deps if d.startswith("orchestrator"))
              for m, deps in import_graph().items() if m.startswith("actors.")}
    assert {m: d for m, d in upward.items() if d} == {}


def test_entry_points_build_pools_through_the_cluster_module():
    """`run`, `train-rm` and `eval` share one way of building pools; nothing else constructs an ActorPool."""
    graph = import_graph()
    for stage in ("orchestrator.session", "orchestrator.reward_training", "orchestrator.evaluation"):
        assert "orchestrator.cluster" in graph[stage], stage
    builders = sorted(m for m in graph if "ActorPool(" in (Path(REPO) / (m.replace(".", "/") + ".py")).read_text())
    assert builders == ["orchestrator.cluster"]
