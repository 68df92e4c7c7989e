"""The package's layering, read from its imports (ast, function-level and TYPE_CHECKING imports
included): no import cycle, and each layer imports only what sits below it.

    ground     losses/, distributed.py, samplers.py, evaluate.py, retrieval.py, options.py (the options' base),
               model_card.py
    plug-ins   losses/ (with their options), data/, models/, tasks/, optim.py, trackers.py; never config.py
    config     config.py: composes the plug-ins' options
    the loop   train_loop.py, grad_cache.py, queue.py: config and plug-ins, nothing of the driver
    driver     trainer.py, tune.py, callbacks.py, report.py, embedding.py, corpus.py (and train.py outside the package)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "distributed_cl"
GROUND = ("losses", "distributed", "samplers", "evaluate", "retrieval", "options", "model_card")
PLUG_INS = ("losses", "data", "models", "tasks", "optim", "trackers")
LOOP = ("train_loop", "grad_cache", "queue")
DRIVER = ("trainer", "tune", "callbacks", "report", "embedding", "corpus", "train")


def module_files(package: Path) -> dict[str, Path]:
    """Dotted module names under the package (relative to it: `losses.core`, `config`) -> file."""
    modules = {}
    for path in package.rglob("*.py"):
        parts = path.relative_to(package).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def import_graph(package: Path) -> dict[str, set[str]]:
    """module -> the package's modules it imports, anywhere in its file. (As import-linter does,
    a submodule's import is an edge to that submodule only, not to the packages above it.)"""
    modules = module_files(package)
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from pkg.a import b`: the module pkg.a.b if there is one, else pkg.a
                targets = [f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}".removeprefix(
                    package.name + ".") in modules else node.module for alias in node.names]
            else:
                continue
            imported |= {t.removeprefix(package.name + ".") for t in targets if t.startswith(package.name + ".")}
        graph[name] = {m for m in imported if m != name and m in modules}
    return graph


def layer(module: str) -> str:
    return module.split(".", 1)[0]


def in_any(module: str, layers: tuple[str, ...]) -> bool:
    return layer(module) in layers


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every import cycle, each once (as found by depth-first search)."""
    found, state, stack = [], {}, []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Each import that breaks a layering rule, as `importer -> imported: rule`."""
    broken = []
    for importer, imported in sorted(graph.items()):
        for target in sorted(imported):
            rules = [
                (in_any(importer, GROUND) and not in_any(target, GROUND), "the ground imports nothing above it"),
                ((layer(importer), layer(target)) in (("data", "models"), ("models", "data")),
                 "data/ and models/ do not import each other"),
                (in_any(importer, PLUG_INS) and target == "config", "no plug-in imports config.py"),
                (layer(importer) in ("tasks", "data", "models") and in_any(target, LOOP + DRIVER),
                 "tasks/, data/ and models/ import nothing of the loop"),
                (in_any(importer, LOOP) and in_any(target, DRIVER), "the loop imports nothing of the driver"),
            ]
            broken += [f"{importer} -> {target}: {rule}" for bad, rule in rules if bad]
    return broken


def test_the_package_has_no_import_cycle_and_keeps_its_layers():
    graph = import_graph(PACKAGE)
    assert {"config", "train_loop", "losses.core", "tasks.base", "data.formats"} <= set(graph)  # it read the package
    assert "losses" in graph["config"] and "tasks" in graph["config"]  # config composes the plug-ins
    assert cycles(graph) == []
    assert violations(graph) == []


@pytest.mark.parametrize("files,expected", [
    ({"config.py": "from pkg.tasks import base", "tasks/__init__.py": "", "tasks/base.py": "import pkg.config"},
     ["cycle", "tasks.base -> config: no plug-in imports config.py"]),
    ({"losses/__init__.py": "", "losses/core.py": "def f():\n    from pkg.models import image",
      "models/__init__.py": "", "models/image.py": "from pkg.data.table import Table",
      "data/__init__.py": "", "data/table.py": ""},
     ["losses.core -> models.image: the ground imports nothing above it",
      "models.image -> data.table: data/ and models/ do not import each other"]),
    ({"train_loop.py": "from pkg.callbacks import DATA_ERROR", "callbacks.py": "",
      "tasks/__init__.py": "from pkg import grad_cache", "grad_cache.py": ""},
     ["tasks -> grad_cache: tasks/, data/ and models/ import nothing of the loop",
      "train_loop -> callbacks: the loop imports nothing of the driver"]),
])
def test_the_checks_catch_a_cycle_and_each_broken_rule(tmp_path, files, expected):
    """The checks above, on small packages that break them (function-level imports count too)."""
    package = tmp_path / "pkg"
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text + "\n")
    graph = import_graph(package)
    found = violations(graph) + (["cycle"] if cycles(graph) else [])
    assert sorted(found) == sorted(expected)
