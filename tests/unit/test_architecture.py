"""The walls between the parts (docs/architecture.md, "The components"), held by tests:

* no module of `service/` loads torch or ray (the CLI answers at once and runs anywhere);
* the method core (models, loss, dictionaries, sampler, probe, trainer and their helpers)
  never imports ray, even lazily: it runs in one process, in a Ray worker or in an actor;
* no import circles between the project's modules, counting imports inside functions too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "workers", "jobs")
METHOD_CORE = (
    "workers.models",
    "workers.loss",
    "workers.dictionary",
    "workers.sampler",
    "workers.probe",
    "workers.trainer",
    "workers.diagnostics",
    "workers.tensors",
)


def project_modules(package: str) -> list[str]:
    """Every module of a package, by dotted name (packages as their `__init__`)."""
    names = []
    for path in sorted((PROJECT / package).rglob("*.py")):
        parts = path.relative_to(PROJECT).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def module_file(name: str) -> Path:
    path = PROJECT / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_names(name: str) -> set[str]:
    """Every module `name` imports anywhere in its file (top level or inside functions), as
    dotted names; `from a import b` counts as `a.b` when that is a module, else as `a`."""
    tree = ast.parse(module_file(name).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def import_graph() -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    modules = {m for package in PACKAGES for m in project_modules(package)}
    return {m: {i for i in imported_names(m) if i in modules and i != m} for m in modules}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def first_module_loading(modules: list[str], heavy: tuple[str, ...]) -> str:
    """Import `modules` one after another in a fresh interpreter; the first one after which
    any of `heavy` is loaded, as "module: heavy", or "" when none is."""
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}:\n"
        "    importlib.import_module(name)\n"
        f"    loaded = [h for h in {heavy!r} if h in sys.modules]\n"
        "    if loaded:\n"
        "        print(name + ': ' + ','.join(loaded))\n"
        "        break\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=300, check=True
    )
    return result.stdout.strip()


def test_no_module_of_service_loads_torch_or_ray():
    modules = project_modules("service")
    assert len(modules) > 10, modules
    assert first_module_loading(modules, ("torch", "ray")) == ""


def test_the_method_core_never_imports_ray_even_lazily():
    graph = import_graph()
    reachable, todo = set(), list(METHOD_CORE)
    while todo:  # every project module the core can reach through any import
        module = todo.pop()
        if module not in reachable:
            reachable.add(module)
            todo.extend(graph[module])
    offenders = sorted(m for m in reachable if any(i == "ray" or i.startswith("ray.") for i in imported_names(m)))
    assert offenders == [], f"the method core reaches ray through {offenders}"
    assert first_module_loading(list(METHOD_CORE), ("ray",)) == ""


def test_no_import_circles():
    graph = import_graph()
    assert len(graph) > 40
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
