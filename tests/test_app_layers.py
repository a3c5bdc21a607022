"""The service's import graph: `app` imports `models` only (and `models` never `app`), each
package of `app/` imports only the layers below its own (the docstring of `app/__init__.py`),
no two modules import each other, and a worker never imports the trainer's data stack."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Lowest first; a module may import its own layer and those before it. search and store share
# a layer but may not import each other; within the services layer, any order without cycles.
LAYERS: list[set[str]] = [
    {
        *("app", "app.settings", "app.config", "app.errors", "app.logs", "app.metrics"),
        "app.background",
    },
    {"app.search", "app.store"},
    {"app.model"},
    {
        "app.batcher",
        "app.user_vector_cache",
        "app.feature_checks",
        "app.filters",
        "app.retrieval",
        "app.recall",
        "app.users",
        "app.catalogue",
        "app.services",
    },
    {"app.http"},
    {"app.main", "app.workers", "app.__main__"},
]
APART = {("app.search", "app.store"), ("app.store", "app.search")}


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of its code (lazy imports too), relative
    imports resolved against its package."""
    module = _module(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            source = importlib.util.resolve_name("." * node.level + (node.module or ""), package)
            found.add(source)
            found |= {f"{source}.{alias.name}" for alias in node.names}
    return found


def _graph(package: str) -> dict[str, set[str]]:
    modules = {_module(p): p for p in (ROOT / package).rglob("*.py")}
    return {name: {m for m in _imports(path) if m in modules} for name, path in modules.items()}


def _unit(module: str) -> str:
    """The unit a module is layered as: its subpackage of `app`, or the module itself."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _layer(module: str) -> int:
    unit = _unit(module)
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def test_app_imports_only_downward() -> None:
    graph = _graph("app")
    wrong = [
        (source, target)
        for source, targets in graph.items()
        for target in targets
        if _unit(source) != _unit(target)
        and (_layer(target) > _layer(source) or (_unit(source), _unit(target)) in APART)
    ]
    assert wrong == []


def test_no_module_cycles_and_models_never_imports_app() -> None:
    graph = _graph("app")
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            assert state.get(target) != 1, " -> ".join([*path, module, target])
            if target not in state:
                visit(target, [*path, module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    models = [
        p
        for p in (ROOT / "models").rglob("*.py")
        if any(m == "app" or m.startswith("app.") for m in _imports(p))
    ]
    assert models == []


def test_a_worker_imports_no_trainer_data_stack() -> None:
    code = (
        "import sys, app.main; "
        "print(sorted(m for m in ('pandas', 'models.online_store') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"
