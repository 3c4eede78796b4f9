"""The package's layers, read from the source (no import runs): each seam imports only what is below it, backends
are reached only through their one factory, and no import cycle exists (function-level imports included).

The layers (docs/method.md, "The package map"): ``defaults``, ``survey``, ``targets``, ``regions`` at the bottom;
``model/`` (the model seam) and ``registry/`` (the storage seam) above them and apart from each other;
scoring, training and ``serving/`` (the engine seam) above those; ``api``, then ``cli`` and ``service.py`` on top.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "culign"
# the old flat paths, kept one release as re-export shims: they point at the new homes and nothing imports them
SHIMS = {"culign.runtime", "culign.engine", "culign.scheduler", "culign.vllm_engine", "culign.adapter_cache",
         "culign.settings", "culign.auth", "culign.object_registry"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PKG.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PKG.rglob("*.py")}


MODULES = _modules()


def _resolve(name: str) -> str:
    """A dotted name imported -> the module it is (``culign.registry.AdapterInfo`` -> ``culign.registry``)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name


def imports_of(module: str) -> set[str]:
    """Every culign module ``module`` imports, at module level or inside a function."""
    path = MODULES[module]
    is_package = path.name == "__init__.py"
    base = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = base
                for _ in range(node.level - 1):
                    anchor = anchor.rpartition(".")[0]
                root = f"{anchor}.{node.module}" if node.module else anchor
            else:
                root = node.module or ""
            names = [f"{root}.{a.name}" for a in node.names]  # `from . import defaults` names a module
        else:
            continue
        for name in names:
            if name == "culign" or name.startswith("culign."):
                target = _resolve(name)
                if target and target != module:
                    found.add(target)
    return found


GRAPH = {m: imports_of(m) for m in MODULES}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _offences(where: str, forbidden: tuple[str, ...]) -> list[str]:
    return [f"{m} imports {t}" for m, deps in GRAPH.items() if _under(m, where)
            for t in deps if any(_under(t, f) for f in forbidden)]


def test_the_graph_was_read():
    for package in ("culign.model", "culign.registry", "culign.serving", "culign.serving.engines", "culign.cli"):
        assert package in MODULES, package
    assert "culign.registry.format" in GRAPH["culign.registry.local"]  # a relative import was followed
    assert "culign.model.runtime" in GRAPH["culign.serving.chat"]


def test_registry_format_knows_no_backend_and_no_model():
    allowed = {"culign"}  # culign.__version__, stamped into provenance
    assert GRAPH["culign.registry.format"] <= allowed, GRAPH["culign.registry.format"]


@pytest.mark.parametrize("backend", ["culign.registry.base", "culign.registry.local", "culign.registry.s3"])
def test_registry_backends_import_only_the_format_and_the_base(backend):
    assert GRAPH[backend] <= {"culign.registry.format", "culign.registry.base"}, GRAPH[backend]


def test_the_registry_knows_nothing_above_it():
    assert _offences("culign.registry", ("culign.model", "culign.serving", "culign.scorer", "culign.trainer",
                                         "culign.optimize", "culign.api", "culign.cli", "culign.fanout")) == []


def test_the_model_never_imports_serving_registry_or_training():
    assert _offences("culign.model", ("culign.serving", "culign.registry", "culign.scorer", "culign.optimize",
                                      "culign.trainer", "culign.evaluation", "culign.validity", "culign.api",
                                      "culign.cli", "culign.fanout")) == []


def test_serving_never_imports_training_or_the_api():
    assert _offences("culign.serving", ("culign.scorer", "culign.optimize", "culign.trainer", "culign.evaluation",
                                        "culign.validity", "culign.api", "culign.cli", "culign.fanout")) == []


@pytest.mark.parametrize("backend,factory", [
    ("culign.registry.local", "culign.registry"), ("culign.registry.s3", "culign.registry"),
    ("culign.serving.engines.scheduler", "culign.serving.engines"),
    ("culign.serving.engines.vllm", "culign.serving.engines")])
def test_backends_are_reached_only_through_their_factory(backend, factory):
    importers = {m for m, deps in GRAPH.items() if backend in deps} - {factory} - SHIMS
    assert importers == set(), f"{backend} is imported directly by {sorted(importers)}; use {factory}'s factory"


def test_nothing_imports_a_deprecated_shim():
    assert [f"{m} imports {t}" for m, deps in GRAPH.items() if m not in SHIMS for t in deps if t in SHIMS] == []


def test_no_import_cycle():
    """Edges from a module to its own enclosing packages are left out: Python imports a package before its
    submodules, so ``culign.serving.chat`` -> ``culign.serving`` is no cycle of ours."""
    graph = {m: {t for t in deps if not _under(m, t)} for m, deps in GRAPH.items()}
    graph = {m: deps - {"culign"} for m, deps in graph.items()}  # culign/__init__ is lazy (PEP 562 __getattr__)
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph.get(m, ())):
            if state.get(t) == 1:
                cycles.append(stack[stack.index(t):] + [t])
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == [], "\n".join(" -> ".join(c) for c in cycles)
