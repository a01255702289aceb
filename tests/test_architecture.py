"""The layout is a contract too: three floors whose imports point one way, no import circles, no
module over 500 lines (CONTRIBUTING.md, "How the code is layered")."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("MoMKE", "dataloader")
ENTRY_POINTS = {"MoMKE.sweep", "MoMKE.report", "MoMKE.bench", "MoMKE.parity", "MoMKE.evaluate",
                "MoMKE.predict"}
MAX_LINES = 500


def project_modules() -> dict[str, Path]:
    """Every module of the project by dotted name (packages by their __init__)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            modules[name] = path
    return modules


def imports_of(path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `path` imports, at its top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(name for name in names if name in modules)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    graph = {name: imports_of(path, modules) - {name} for name, path in modules.items()}
    # `from MoMKE.results import report` names the package too: the package itself is only its
    # docstring, so an edge to it is no dependency.
    packages = {name for name, path in modules.items() if path.name == "__init__.py"}
    return {name: targets - packages for name, targets in graph.items()}


def floor(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry point"
    if module.startswith("MoMKE.experiments"):
        return "experiments"
    if module.startswith("MoMKE.results"):
        return "results"
    return "method"


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of `graph`, as the list of modules around it, or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                return stack[stack.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[node] = "done"
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_finder_sees_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circles():
    assert find_cycle(import_graph()) is None


def test_floors_point_down():
    allowed = {"method": {"method"}, "results": {"method", "results"},
               "experiments": {"method", "results", "experiments"},
               "entry point": {"experiments", "results"}}
    wrong = [f"{module} ({floor(module)}) imports {target} ({floor(target)})"
             for module, targets in import_graph().items() for target in sorted(targets)
             if floor(target) not in allowed[floor(module)]]
    assert not wrong


def test_the_data_floor_stands_alone():
    wrong = [f"{module} imports {target}" for module, targets in import_graph().items()
             if module.startswith("dataloader") for target in targets
             if not target.startswith("dataloader")]
    assert not wrong


def test_results_read_saved_runs_and_never_train():
    training = {"MoMKE.trainer", "MoMKE.runner", "MoMKE.train", "MoMKE.stage1_cache"}
    wrong = [f"{module} imports {target}" for module, targets in import_graph().items()
             if floor(module) == "results" for target in targets & training]
    assert not wrong


def test_no_module_over_500_lines():
    long = {name: lines for name, path in project_modules().items()
            if (lines := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long
