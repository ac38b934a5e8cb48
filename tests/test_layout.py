"""The package's rooms and the direction of its arrows, read from the source (no imports executed).

core <- methods <- experiments <- command line, labs and notebooks. Every
import counts, also those inside functions: a function-level import hides a
cycle from Python's loader, not from the reader.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "chapter11"

CORE = {"sparsity", "masks", "data", "models", "train", "plots", "report", "stats", "bench"}
METHODS = {"magnitude", "schedules", "sensitivity", "deep_compression", "lottery", "movement", "structured", "distill", "dynamic",
           "oneshot", "csr", "nm", "export"}
TOP = {"__main__", "labs", "check"}  # the command line and the labs: they may import anything, nothing imports them
# A method builds on another only where the chapter does; each edge says why.
METHOD_EDGES = {
    ("lottery", "magnitude"): "a ticket is found by iterative magnitude pruning",
    ("schedules", "magnitude"): "a schedule says how much; magnitude says which weights",
    ("sensitivity", "magnitude"): "sensitivity is measured by pruning each layer by magnitude",
}
MOVEMENT_MAX_LINES = 700
METHOD_MAX_LINES = 850  # "about 800"


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path  # "" is the package itself
    return found


MODULES = _modules()


def _resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """Modules of this package that an import statement in `module` reaches."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        if node.level:
            package = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = package[: len(package) - node.level + 1]
            prefix = ".".join(["chapter11", *base, *([node.module] if node.module else [])])
        else:
            prefix = node.module or ""
        targets = [f"{prefix}.{a.name}" for a in node.names] + [prefix]
    found = set()
    for target in targets:
        if not (target == "chapter11" or target.startswith("chapter11.")):
            continue
        name = target.removeprefix("chapter11").lstrip(".")
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name != module:
            found.add(name)
    return sorted(found)


def _edges() -> dict[str, set[str]]:
    edges = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(), str(path))
        edges[module] = {d for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for d in _resolve(module, node)}
        edges[module].discard("")  # `from chapter11 import x` names a submodule, resolved above
    return edges


EDGES = _edges()


def _room(module: str) -> str:
    head = module.split(".")[0]
    if head == "experiments":
        return "experiments"
    for room, names in (("core", CORE), ("methods", METHODS), ("top", TOP)):
        if head in names:
            return room
    return "package" if module == "" else "unknown"


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_checker_sees_function_level_imports_and_cycles():
    assert "report" in EDGES["masks"] and "masks" in EDGES["train"]
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    tree = ast.parse("def f():\n    from .masks import apply_masks\n")
    assert _resolve("train", tree.body[0].body[0]) == ["masks"]


def test_every_module_has_a_room():
    assert not [m for m in MODULES if _room(m) == "unknown"]


def test_no_import_cycle_inside_the_package():
    assert _cycles(EDGES) == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_arrows_point_one_way(module):
    room = _room(module)
    for dep in EDGES[module]:
        other = _room(dep)
        if room == "top":
            continue
        assert other != "top", f"{module} imports {dep}: nothing but the command line imports the command line or the labs"
        if room == "core":
            assert other == "core", f"core module {module} imports {dep} ({other})"
        elif room == "methods":
            assert other in ("core", "methods"), f"method module {module} imports {dep} ({other})"
            a, b = module.split(".")[0], dep.split(".")[0]
            assert other == "core" or a == b or (a, b) in METHOD_EDGES, f"{module} imports the method {dep}: add it to METHOD_EDGES with the chapter's reason, or move it"
        elif room == "experiments":
            assert other in ("core", "methods", "experiments"), f"driver {module} imports {dep} ({other})"


def _definitions(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            yield node


DRIVER_NAME = re.compile(r"(^benchmark_main$|_main$|_grid$|_sweep$|^compare_methods$)")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if _room(m) in ("core", "methods")))
def test_drivers_live_in_experiments(module):
    """No settings dataclass, grid, run recorder or benchmark command line outside chapter11/experiments/."""
    for node in _definitions(MODULES[module]):
        if isinstance(node, ast.ClassDef):
            assert not node.name.endswith("Settings"), f"{module}.{node.name}: settings of an experiment belong in chapter11.experiments"
            continue
        public = not node.name.startswith("_")
        assert not (public and DRIVER_NAME.search(node.name)), f"{module}.{node.name} is a driver: move it to chapter11.experiments"
        if module != "report":  # where save_full_run itself is defined
            calls = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", "") for n in ast.walk(node) if isinstance(n, ast.Call)}
            assert "save_full_run" not in calls, f"{module}.{node.name} records a run: recorders belong in chapter11.experiments"


def test_method_modules_fit_in_one_sitting():
    sizes = {m: len(p.read_text().splitlines()) for m, p in MODULES.items() if _room(m) == "methods" and p.name != "__init__.py"}
    assert sizes["movement"] < MOVEMENT_MAX_LINES, sizes["movement"]
    assert {m: n for m, n in sizes.items() if n > METHOD_MAX_LINES} == {}


def test_notebooks_take_drivers_from_experiments():
    import json

    moved = {"run_grid", "full_run", "prune_grid", "calibration_ablation", "equal_budget_sweep", "compare_methods", "measure_speed",
             "benchmark", "benchmark_onnx", "semi_structured_benchmark"}
    for path in sorted((PACKAGE.parent / "notebooks").glob("[0-9][0-9]_*.ipynb")):
        cells = [c for c in json.loads(path.read_text())["cells"] if c["cell_type"] == "code"]
        for cell in cells:
            for node in ast.walk(ast.parse("".join(cell["source"]))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("chapter11."):
                    names = {a.name for a in node.names}
                    if names & moved:
                        assert node.module.startswith("chapter11.experiments."), f"{path.name}: {sorted(names & moved)} from {node.module}"
