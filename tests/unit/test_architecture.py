"""The layers and walls between the parts (docs/architecture.md, "Layers"), held by tests:

* one direction of imports, counting imports inside functions: the ground floor
  (`service`) imports no other layer, `workers` imports neither `jobs` nor `cli`, `jobs`
  does not import `cli`; the command line (`cli`) may import every layer;
* no module of `service/` loads torch or ray, and loading the command line or a job's entry
  point does not either (the CLI and `python -m jobs.X --help` answer at once);
* the method core (models, loss, dictionaries, sampler, step, trainer and their helpers)
  never imports ray, even lazily: it runs in one process, in a Ray worker or in an actor;
* no import circles between the project's modules;
* no module over 500 lines;
* only the actor's typed client (`workers/actor.py`) calls `.remote()` on the dictionary
  actor's methods;
* no setting is read from an environment variable when a module is imported.

Each checker takes a project folder, so the tests below also plant a violation of each rule
in a small tree of their own and see the checker name it.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

PROJECT = Path(__file__).resolve().parents[2]
PACKAGES = ("service", "workers", "jobs", "cli")
LAYERS = {"service": 0, "workers": 1, "jobs": 2, "cli": 3}  # a layer imports only layers below it
MAX_LINES = 500
ACTOR_MODULE = "workers.actor"
ACTOR_CLASS = "DictionaryService"
METHOD_CORE = (
    "workers.models",
    "workers.loss",
    "workers.dictionary",
    "workers.sampler",
    "workers.probe",
    "workers.step",
    "workers.enqueue",
    "workers.training",
    "workers.trainer",
    "workers.diagnostics",
    "workers.tensors",
)


def project_modules(root: Path, package: str) -> list[str]:
    """Every module of a package, by dotted name (packages as their `__init__`)."""
    names = []
    for path in sorted((root / package).rglob("*.py")):
        parts = path.relative_to(root).with_suffix("").parts
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def all_modules(root: Path) -> list[str]:
    return [m for package in PACKAGES if (root / package).is_dir() for m in project_modules(root, package)]


def module_file(root: Path, name: str) -> Path:
    path = root / Path(*name.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def imported_names(root: Path, name: str, modules: set[str] | frozenset[str] = frozenset()) -> set[str]:
    """Every module `name` imports anywhere in its file (top level or inside functions), as
    dotted names; `from a import b` counts as `a.b` when that is one of `modules`, else as `a`."""
    tree = ast.parse(module_file(root, name).read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in modules else node.module)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """Project module -> the project modules it imports."""
    modules = set(all_modules(root))
    return {m: {i for i in imported_names(root, m, modules) if i in modules and i != m} for m in modules}


def layer_violations(root: Path) -> list[str]:
    """Imports against the layers, as "a -> b"."""
    graph = import_graph(root)
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        for target in targets
        if LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]
    )


def package_graph(root: Path) -> dict[str, dict[str, int]]:
    """Package -> package -> number of imports (the picture of the layers)."""
    edges: dict[str, dict[str, int]] = {}
    for module, targets in import_graph(root).items():
        for target in targets:
            a, b = module.split(".")[0], target.split(".")[0]
            edges.setdefault(a, {}).setdefault(b, 0)
            edges[a][b] += 1
    return edges


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


def long_modules(root: Path, limit: int = MAX_LINES) -> list[str]:
    """Modules over `limit` lines, as "name: lines"."""
    out = []
    for name in all_modules(root):
        lines = len(module_file(root, name).read_text().splitlines())
        if lines > limit:
            out.append(f"{name}: {lines}")
    return out


def actor_methods(root: Path) -> set[str]:
    """The public methods of the dictionary actor's class."""
    tree = ast.parse(module_file(root, ACTOR_MODULE).read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == ACTOR_CLASS:
            return {f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}
    raise AssertionError(f"{ACTOR_MODULE} has no class {ACTOR_CLASS}")


def remote_actor_calls(root: Path) -> list[str]:
    """Calls `<x>.<actor method>.remote(...)` outside the actor's module, as "module:line"."""
    methods = actor_methods(root)
    found = []
    for name in all_modules(root):
        if name == ACTOR_MODULE:
            continue
        for node in ast.walk(ast.parse(module_file(root, name).read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "remote"
                and isinstance(node.func.value, ast.Attribute)
                and node.func.value.attr in methods
            ):
                found.append(f"{name}:{node.lineno}")
    return found


def _reads_environment(node: ast.AST) -> bool:
    for inner in ast.walk(node):
        if isinstance(inner, ast.Attribute) and inner.attr in ("environ", "getenv"):  # os under any name
            return True
        if isinstance(inner, ast.Name) and inner.id in ("getenv", "environ"):
            return True
    return False


def environment_at_import(root: Path) -> list[str]:
    """Statements that run when a module is imported (its top level and class bodies, not
    function bodies) and read an environment variable, as "module:line"."""
    found = []

    def visit(body: list[ast.stmt], module: str) -> None:
        for stmt in body:
            if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue  # runs when called, not when imported (its decorators aside)
            if isinstance(stmt, ast.ClassDef):
                visit(stmt.body, module)
                continue
            if _reads_environment(stmt):
                found.append(f"{module}:{stmt.lineno}")

    for name in all_modules(root):
        if name.endswith("__main__"):
            continue
        visit(ast.parse(module_file(root, name).read_text()).body, name)
    return found


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


# --- the project holds every rule -------------------------------------------------------------


def test_imports_go_one_way_down_the_layers():
    graph = package_graph(PROJECT)
    print("imports by package:", {a: dict(sorted(b.items())) for a, b in sorted(graph.items())})
    assert layer_violations(PROJECT) == []
    assert set(graph["cli"]) <= set(LAYERS) and set(graph["service"]) == {"service"}


JOB_ENTRY_POINTS = ("jobs.pretrain", "jobs.evaluate", "jobs.finetune", "jobs.ablate", "jobs.bench", "jobs.bench.cli")


def test_no_module_of_service_or_the_command_line_nor_a_job_entry_point_loads_torch_or_ray():
    """The CLI answers at once, and so does `python -m jobs.X --help` (the image's own check)."""
    modules = project_modules(PROJECT, "service") + project_modules(PROJECT, "cli") + list(JOB_ENTRY_POINTS)
    assert len(modules) > 20, modules
    assert first_module_loading([m for m in modules if not m.endswith("__main__")], ("torch", "ray")) == ""


def test_the_method_core_never_imports_ray_even_lazily():
    graph = import_graph(PROJECT)
    reachable, todo = set(), list(METHOD_CORE)
    while todo:  # every project module the core can reach through any import
        module = todo.pop()
        if module not in reachable:
            reachable.add(module)
            todo.extend(graph[module])
    offenders = sorted(
        m for m in reachable if any(i == "ray" or i.startswith("ray.") for i in imported_names(PROJECT, m))
    )
    assert offenders == [], f"the method core reaches ray through {offenders}"
    assert first_module_loading(list(METHOD_CORE), ("ray",)) == ""


def test_no_import_circles():
    graph = import_graph(PROJECT)
    assert len(graph) > 60
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph) or [])


def test_no_module_is_longer_than_500_lines():
    assert long_modules(PROJECT) == []


def test_only_the_actors_client_calls_remote_on_the_actor():
    assert {"submit", "state_dict", "reseed", "request_stop"} <= actor_methods(PROJECT)
    assert remote_actor_calls(PROJECT) == []


def test_no_setting_is_read_from_the_environment_at_import():
    assert environment_at_import(PROJECT) == []


# --- each checker names a planted violation -----------------------------------------------------


@pytest.fixture
def tree(tmp_path: Path):
    """A minimal project of the four layers, every rule held; `tree(path, text)` adds a file."""
    files = {
        "service/__init__.py": "",
        "service/config.py": "X = 1\n",
        "workers/__init__.py": "",
        "workers/actor.py": "class DictionaryService:\n    def submit(self):\n        pass\n",
        "workers/loop.py": "from service import config\n",
        "jobs/__init__.py": "",
        "jobs/pretrain.py": "from workers import loop\n",
        "cli/__init__.py": "",
        "cli/main.py": "from jobs import pretrain\n",
    }

    def write(path: str, text: str) -> Path:
        target = tmp_path / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        return tmp_path

    for path, text in files.items():
        write(path, text)
    return write


def test_a_planted_upward_import_is_named(tree):
    assert layer_violations(tree("service/__init__.py", "")) == []
    root = tree("service/config.py", "def f():\n    from workers import loop\n")  # inside a function
    assert layer_violations(root) == ["service.config -> workers.loop"]
    root = tree("jobs/pretrain.py", "from cli import main\n")
    assert "jobs.pretrain -> cli.main" in layer_violations(root)


def test_a_planted_circle_and_a_long_module_are_named(tree):
    root = tree("workers/loop.py", "from workers import actor\n")
    root = tree("workers/actor.py", "from workers import loop\nclass DictionaryService:\n    pass\n")
    cycle = find_cycle(import_graph(root))
    assert cycle is not None and set(cycle) == {"workers.actor", "workers.loop"}
    root = tree("jobs/big.py", "x = 1\n" * 501)
    assert long_modules(root) == ["jobs.big: 501"]


def test_a_planted_remote_call_on_the_actor_is_named(tree):
    root = tree("workers/loop.py", "def f(handle, task):\n    task.remote()\n    return handle.submit.remote()\n")
    assert remote_actor_calls(root) == ["workers.loop:3"]


def test_a_planted_environment_read_at_import_is_named(tree):
    root = tree(
        "service/config.py",
        "import os\nimport os as _os\nBUDGET = float(os.environ.get('B', '1'))\n\ndef f():\n    return os.getenv('C')\n"
        "RETRIES = _os.getenv('R')\n",
    )
    assert environment_at_import(root) == ["service.config:3", "service.config:7"]


def test_the_cycle_finder_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
