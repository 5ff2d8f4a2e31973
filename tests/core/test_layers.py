"""The package's layers: imports go one way (public → checks, adapters → math), no cycle.

Function-level imports count: every ``import``/``from … import`` in a module's AST is an edge.
"""

from __future__ import annotations

import ast
from pathlib import Path

import multixent

ROOT = Path(multixent.__file__).resolve().parent
PKG = ROOT.name


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT.parent).with_suffix("")
        mods[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return mods


def _graph() -> dict[str, set[str]]:
    mods = _modules()

    def resolve(cur: str, node: ast.ImportFrom) -> list[str]:
        base = cur.split(".") if mods[cur].name == "__init__.py" else cur.split(".")[:-1]
        if node.level:
            base = base[: len(base) - (node.level - 1)]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        out = []
        for alias in node.names:
            for candidate in (f"{prefix}.{alias.name}", prefix):
                if candidate in mods:
                    out.append(candidate)
                    break
        return out

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                graph[m].update(t for t in resolve(m, node) if t != m)
            elif isinstance(node, ast.Import):
                graph[m].update(a.name for a in node.names if a.name in mods and a.name != m)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    # a package __init__ re-exporting its children is not a cycle of the layers
    return [c for c in found if len(c) > 2 or not all(x == PKG or (x.count(".") == 1 and PKG in c) for x in c)]


def test_no_import_cycle() -> None:
    """No cycle among the package's modules. Every import is an edge, function-level ones too (stricter than
    the module-level imports only, whose cycles break at import time): an import moved into a function to
    dodge a cycle still inverts the layers. A package's ``__init__`` importing its own child is no cycle."""
    assert _cycles(_graph()) == []


def test_math_imports_only_math() -> None:
    """The math layer: the formulas (importing only the array lookups, ``_compat``, a leaf), the two ways
    to run them (fused, blocked in place) beside them, and the row functions that walk the blocks."""
    graph = _graph()
    mods = {name: f"{PKG}.{name}" for name in ("_formulas", "_fused", "_blocked", "_rows", "_linear", "_compat")}
    math_layer = set(mods.values())
    for m in math_layer:
        assert graph[m] <= math_layer, f"{m} imports {sorted(graph[m] - math_layer)}"
    assert graph[mods["_compat"]] == set()
    assert graph[mods["_formulas"]] <= {mods["_compat"]}
    assert graph[mods["_fused"]] <= {mods["_formulas"], mods["_compat"]}
    assert graph[mods["_blocked"]] <= {mods["_formulas"], mods["_fused"], mods["_compat"]}
    assert graph[mods["_rows"]] <= {mods["_formulas"], mods["_fused"], mods["_blocked"], mods["_compat"]}


def test_adapters_never_import_the_public_layer() -> None:
    graph = _graph()
    adapters = [m for m in graph if m == f"{PKG}._adapters" or m.startswith(f"{PKG}._adapters.")]
    assert len(adapters) == 5  # the package, generic, torch, jax, dtensor
    for m in adapters:
        assert not graph[m] & {PKG, f"{PKG}._api", f"{PKG}._checks"}, f"{m} imports {sorted(graph[m])}"


def test_checks_import_only_math() -> None:
    assert _graph()[f"{PKG}._checks"] <= {f"{PKG}._formulas", f"{PKG}._compat"}


def test_no_module_imports_another_modules_private_name():
    """``from .x import _name`` and ``_module._name`` across the package's modules: none (a private name
    is its module's own; what another module needs is named without the underscore)."""
    mods = _modules()
    short = {name.rsplit(".", 1)[-1] for name in mods}
    found = []
    for m, f in mods.items():
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith(PKG)):
                found += [f"{m}: from {node.module} import {a.name}" for a in node.names if _private(a.name, short)]
            elif _foreign_private(node, m, short):
                found.append(f"{m}: {node.value.id}.{node.attr}")
    assert not found, found


def _private(name: str, modules: set[str]) -> bool:
    """An underscore name that is not a module itself (``from . import _formulas`` imports a module)."""
    return name.startswith("_") and not name.startswith("__") and name not in modules


def _foreign_private(node: ast.AST, module: str, modules: set[str]) -> bool:
    """``_other._name``: another module's private name, read as an attribute."""
    if not (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in modules):
        return False
    return node.value.id != module.rsplit(".", 1)[-1] and _private(node.attr, modules)
