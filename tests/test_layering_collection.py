"""The layers of lookalike.collection, read from the source with ``ast``: who may import the Collection
itself, where SQL may be run, which module holds the lock, and that file writes go through lookalike.atomic."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import lookalike

SRC = Path(lookalike.__file__).parent
PACKAGE = "lookalike.collection"
COLLECTION = f"{PACKAGE}.collection"
MAY_IMPORT_COLLECTION = {f"{PACKAGE}", f"{PACKAGE}.check"}  # the package's public face, and the checker
SQL_CALLS = {"execute", "executemany", "executescript"}
SQL_TEXT = re.compile(r"^\s*(SELECT|INSERT|UPDATE|DELETE|CREATE|ALTER|DROP|PRAGMA|BEGIN|COMMIT|ROLLBACK)\b")
WRITE_CALLS = {"replace", "rename", "write_text", "write_bytes", "pwrite", "write"}


def module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def collection_modules() -> dict[str, ast.Module]:
    return {
        module_name(path): ast.parse(path.read_text(), str(path))
        for path in sorted((SRC / "collection").glob("*.py"))
    }


def imported(tree: ast.Module, module: str, submodules: set[str]) -> set[str]:
    """Every module ``tree`` imports anywhere (``TYPE_CHECKING`` blocks and functions included); a name
    taken from a package is that submodule when it is one. Relative imports are resolved from ``module``."""
    package = module if module == PACKAGE else module.rsplit(".", 1)[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in submodules)
    return found


def docstrings(tree: ast.Module) -> set[int]:
    """The ids of the docstring nodes of a module, its classes and functions."""
    bodies = [n.body for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.ClassDef, ast.FunctionDef))]
    return {
        id(b[0].value)
        for b in bodies
        if b and isinstance(b[0], ast.Expr) and isinstance(b[0].value, ast.Constant)
    }


def sql_in(tree: ast.Module) -> list[str]:
    """The SQL a module runs or spells: calls of ``execute``/``executemany``/``executescript`` and string
    constants that start as a statement (docstrings are prose and do not count)."""
    prose = docstrings(tree)
    calls = [
        f"line {n.lineno}: .{n.func.attr}("
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr in SQL_CALLS
    ]
    texts = [
        f"line {n.lineno}: {n.value.strip()[:40]!r}"
        for n in ast.walk(tree)
        if isinstance(n, ast.Constant)
        and isinstance(n.value, str)
        and SQL_TEXT.match(n.value)
        and id(n) not in prose
    ]
    return calls + texts


def writes_in(tree: ast.Module) -> list[str]:
    """File writes that bypass lookalike.atomic: renames, ``write_text``/``write_bytes``, ``os.pwrite`` and
    ``os.write``, and ``open`` in a writing mode."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in WRITE_CALLS:
            owner = func.value.id if isinstance(func.value, ast.Name) else None
            if func.attr in ("write_text", "write_bytes") or owner == "os":
                found.append(f"line {node.lineno}: {owner or '…'}.{func.attr}(")
        elif isinstance(func, ast.Name) and func.id == "open":
            modes = [a.value for a in node.args[1:2] if isinstance(a, ast.Constant)]
            modes += [
                k.value.value for k in node.keywords if k.arg == "mode" and isinstance(k.value, ast.Constant)
            ]
            if any(isinstance(m, str) and set(m) & set("wax+") for m in modes):
                found.append(f"line {node.lineno}: open(…, {modes[0]!r})")
    return found


def locks_in(tree: ast.Module, module: str) -> bool:
    """Whether a module takes file locks (imports ``fcntl``, or calls ``flock``/``lockf``)."""
    calls = (
        n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)
    )
    return "fcntl" in imported(tree, module, set()) or any(attr in ("flock", "lockf") for attr in calls)


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle of ``graph`` (module → modules it imports), or None."""
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*trail[trail.index(target) :], target] if target in trail else [node, target]
            if target not in state and (found := visit(target, [*trail, target])):
                return found
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start, [start])):
            return found
    return None


# -- the checks themselves catch what they are meant to catch -----------------------------------------------


def test_the_import_check_sees_every_spelling_of_an_import() -> None:
    submodules = {COLLECTION, f"{PACKAGE}.store"}
    source = """
from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from lookalike.collection.collection import Collection
def later():
    from . import collection
    from .store import connect
"""
    found = imported(ast.parse(source), f"{PACKAGE}.query", submodules)
    assert {COLLECTION, f"{PACKAGE}.store"} <= found
    assert COLLECTION in imported(ast.parse("import lookalike.collection.collection"), "x", submodules)
    assert COLLECTION in imported(ast.parse("from lookalike.collection import collection"), "x", submodules)


def test_the_sql_check_sees_calls_and_statements_but_not_prose() -> None:
    source = '''
"""Rows are read with PRAGMA user_version."""
def f(db):
    """SELECT is mentioned here, in prose."""
    db.execute(QUERY)
    db.executemany("x", [])
QUERY = "SELECT id FROM images"
'''
    found = sql_in(ast.parse(source))
    assert len(found) == 3, found
    assert sql_in(ast.parse('"""SELECT in a module docstring."""\nTEXT = "selected images"')) == []


def test_the_write_check_sees_writes_that_bypass_atomic() -> None:
    source = """
os.replace(a, b)
path.write_text("x")
open(path, "ab")
open(path, mode="w")
open(path)
open(path, "rb")
"""
    assert len(writes_in(ast.parse(source))) == 4


def test_the_cycle_check_finds_a_circle() -> None:
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_the_lock_check_sees_a_lock() -> None:
    assert locks_in(ast.parse("import fcntl"), "x")
    assert locks_in(ast.parse("from os import lockf\nos.lockf(fd, 1, 0)"), "x")
    assert not locks_in(ast.parse("import os\nos.open(path, 0)"), "x")


# -- the collection package ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def modules() -> dict[str, ast.Module]:
    found = collection_modules()
    assert {COLLECTION, f"{PACKAGE}.query", f"{PACKAGE}.sync", f"{PACKAGE}.store"} <= set(found)
    return found


def test_only_the_package_and_the_checker_import_the_collection_module(
    modules: dict[str, ast.Module],
) -> None:
    importers = {name for name, tree in modules.items() if COLLECTION in imported(tree, name, set(modules))}
    assert importers <= MAY_IMPORT_COLLECTION, sorted(importers - MAY_IMPORT_COLLECTION)


@pytest.mark.parametrize("name", ["query", "sync"])
def test_search_and_sync_never_import_the_collection_module(
    modules: dict[str, ast.Module], name: str
) -> None:
    module = f"{PACKAGE}.{name}"
    assert COLLECTION not in imported(modules[module], module, set(modules))


def test_the_collection_modules_import_no_circle(modules: dict[str, ast.Module]) -> None:
    graph = {
        name: {
            target for target in imported(tree, name, set(modules)) if target in modules and target != PACKAGE
        }
        for name, tree in modules.items()
        if name != PACKAGE
    }
    assert cycle(graph) is None, " → ".join(cycle(graph) or [])


def test_no_sql_outside_the_store(modules: dict[str, ast.Module]) -> None:
    found = {name: sql_in(tree) for name, tree in modules.items() if name != f"{PACKAGE}.store"}
    assert {name: sql for name, sql in found.items() if sql} == {}
    assert sql_in(modules[f"{PACKAGE}.store"]), "the store runs the SQL: the check must see it there"


def test_collection_files_are_written_through_atomic(modules: dict[str, ast.Module]) -> None:
    found = {name: writes_in(tree) for name, tree in modules.items()}
    assert {name: writes for name, writes in found.items() if writes} == {}


def test_the_one_lock_helper_is_in_atomic_and_the_collection_takes_no_lock_of_its_own(
    modules: dict[str, ast.Module],
) -> None:
    assert locks_in(ast.parse((SRC / "atomic.py").read_text()), "lookalike.atomic")
    assert [name for name, tree in modules.items() if locks_in(tree, name)] == []
