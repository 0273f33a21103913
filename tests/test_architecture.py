"""The import graph: dependencies point one way and no module imports itself back.

Layers (docs/design): ``ops`` ← ``block`` ← ``models`` ← ``engine`` / ``detection`` ← command
line; ``data``, ``metrics``, ``viz`` and ``config`` depend on nothing above them.  Shared helpers
(``nlnet.io``, ``nlnet.registry``, ``nlnet.seeds``, ``nlnet.classes``) sit below everything.  Two checks:

* each package is imported alone in a fresh interpreter and ``sys.modules`` must hold nothing from
  a layer above it (what really runs, lazy imports excluded);
* every ``import`` statement of ``src/nlnet`` — function-level (lazy) ones included — is parsed
  with :mod:`ast` into a module graph that must have no upward edge and no cycle.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Layer of a module: the longest matching prefix wins.
LAYERS: dict[str, str] = {
    "nlnet.io": "util",
    "nlnet.registry": "util",
    "nlnet.seeds": "util",
    "nlnet.classes": "util",
    "nlnet.ops": "ops",
    "nlnet.geometry": "block",
    "nlnet.block": "block",
    "nlnet.fuse": "block",
    "nlnet.models": "models",
    "nlnet.engine": "engine",
    "nlnet.detection": "detection",
    "nlnet.data": "data",
    "nlnet.metrics": "metrics",
    "nlnet.viz": "viz",
    "nlnet.config": "config",
}
_BASE = {"util"}
_MODEL = _BASE | {"ops", "block", "models"}
_SIDE = {"data", "metrics", "config"}
# What each layer may import (the command line, ``nlnet.cli`` and the top-level command modules,
# may import anything).
ALLOWED: dict[str, set[str]] = {
    "util": _BASE,
    "ops": _BASE | {"ops"},
    "block": _BASE | {"ops", "block"},
    "models": _MODEL,
    "engine": _MODEL | _SIDE | {"engine"},
    "detection": _MODEL | _SIDE | {"engine", "detection"},
    "data": _BASE | {"data"},
    "metrics": _BASE | {"metrics"},
    "config": _BASE | {"config"},
    "viz": _BASE | {"ops", "block", "viz"},
}
PACKAGES = ["ops", "block", "models", "data", "metrics", "viz", "config", "engine", "detection"]
# Command modules that register the detection task only when a config asks for it.
VIDEO_COMMANDS = ["cli.train", "cli.eval"]


def layer(module: str) -> str:
    best = max(
        (p for p in LAYERS if module == p or module.startswith(p + ".")), key=len, default=""
    )
    return LAYERS.get(best, "cli")


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "nlnet").rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def import_graph() -> dict[str, set[str]]:
    """``module -> modules of nlnet it imports`` (any nesting level; ``TYPE_CHECKING`` excluded)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        stack: list[ast.AST] = [ast.parse(path.read_text(encoding="utf-8"))]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.If) and _is_type_checking(node):
                stack.extend(node.orelse)
                continue
            stack.extend(ast.iter_child_nodes(node))
            if isinstance(node, ast.Import):
                targets.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join([*anchor, *([base] if base else [])])
                for a in node.names:
                    sub = f"{base}.{a.name}"
                    targets.add(sub if sub in modules else base)
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[frozenset[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.add(w)
                if w == v:
                    break
            if len(scc) > 1:
                found.append(frozenset(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_graph_sees_lazy_imports() -> None:
    graph = import_graph()
    # nlnet.models.flops imports create_model inside paper_cost_table (function level).
    assert "nlnet.models" in graph["nlnet.models.flops"]
    assert "nlnet.block" in graph["nlnet.geometry"] or "nlnet.geometry" in graph["nlnet.block"]
    assert layer("nlnet.models.flops") == "models" and layer("nlnet.cli.flops") == "cli"


def test_no_upward_import() -> None:
    graph = import_graph()
    bad = sorted(
        f"{a} ({layer(a)}) -> {b} ({layer(b)})"
        for a, targets in graph.items()
        if layer(a) != "cli"
        for b in targets
        if layer(b) not in ALLOWED[layer(a)]
    )
    assert not bad, "upward imports:\n" + "\n".join(bad)


def test_no_import_cycle() -> None:
    cycles = [sorted(c) for c in _cycles(import_graph())]
    assert not cycles, f"import cycles: {cycles}"


def test_cycle_finder_finds_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [frozenset({"a", "b", "c"})]


@pytest.fixture(scope="module")
def loaded_modules() -> dict[str, list[str]]:
    """``package -> nlnet modules in sys.modules`` after importing it alone in a fresh interpreter
    (all packages at once, in parallel)."""
    code = (
        "import importlib, json, sys; importlib.import_module(sys.argv[1]); "
        "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nlnet'))))"
    )
    env = {"PYTHONPATH": str(SRC), "PYTHONDONTWRITEBYTECODE": "1"}
    procs = {
        p: subprocess.Popen(
            [sys.executable, "-c", code, f"nlnet.{p}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for p in [*PACKAGES, *VIDEO_COMMANDS]
    }
    out = {}
    for p, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"import nlnet.{p} failed:\n{stderr}"
        out[p] = json.loads(stdout.strip().splitlines()[-1])
    return out


@pytest.mark.parametrize("package", PACKAGES)
def test_package_imports_nothing_above_it(
    package: str, loaded_modules: dict[str, list[str]]
) -> None:
    loaded = loaded_modules[package]
    own = layer(f"nlnet.{package}")
    above = sorted(m for m in loaded if m != "nlnet" and layer(m) not in ALLOWED[own])
    assert not above, f"import nlnet.{package} loads {above}"
    assert f"nlnet.{package}" in loaded


def test_upward_import_is_detected() -> None:
    # The check above would see an engine module loaded by a models import.
    assert layer("nlnet.engine.trainer") not in ALLOWED[layer("nlnet.models.zoo")]


@pytest.mark.parametrize("command", VIDEO_COMMANDS)
def test_video_commands_do_not_load_detection(
    command: str, loaded_modules: dict[str, list[str]]
) -> None:
    assert not [m for m in loaded_modules[command] if layer(m) == "detection"]


def test_shipped_tasks_register_on_demand() -> None:
    from nlnet.cli.tasks import SHIPPED_TASKS, ensure_task
    from nlnet.engine.task import TASKS

    for name in SHIPPED_TASKS:
        ensure_task(name)
        assert name in TASKS


def test_library_packages_hold_no_command_line_code() -> None:
    """Argument parsing lives in :mod:`nlnet.cli`; the library packages take plain arguments."""
    offenders = []
    for name, path in _modules().items():
        if layer(name) == "cli":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        imports_argparse = any(
            isinstance(n, ast.Import) and any(a.name == "argparse" for a in n.names)
            for n in ast.walk(tree)
        )
        if "add_arguments" in defined or imports_argparse:
            offenders.append(name)
    assert not offenders, f"command-line code in library modules: {offenders}"
