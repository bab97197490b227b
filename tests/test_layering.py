"""The product's floors never import the evaluation (issue 12): no module of ``lookalike.collection``,
``lookalike.recognize``, ``lookalike.serve`` or ``lookalike.labels`` imports ``lookalike.evaluate``, not even
inside a function or under ``TYPE_CHECKING``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lookalike

PACKAGE = Path(lookalike.__file__).parent
LOWER = ("collection", "recognize", "serve", "labels.py")
FORBIDDEN = "lookalike.evaluate"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(source: str, name: str, is_package: bool = False) -> set[str]:
    """Every module the source of module ``name`` imports, as absolute dotted names; ``from a import b``
    counts as importing both ``a`` and ``a.b``, and so does ``import_module("a.b")`` with a literal name."""
    package = name if is_package else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{anchor}.{base}" if base else anchor
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def evaluation_imports(source: str, name: str, is_package: bool = False) -> list[str]:
    return sorted(
        m
        for m in imported_modules(source, name, is_package)
        if m == FORBIDDEN or m.startswith(FORBIDDEN + ".")
    )


def lower_modules() -> list[Path]:
    paths: list[Path] = []
    for part in LOWER:
        target = PACKAGE / part
        paths += [target] if target.is_file() else sorted(target.rglob("*.py"))
    return paths


def test_the_lower_floors_exist() -> None:
    names = {module_name(p) for p in lower_modules()}
    assert {"lookalike.collection.fitting", "lookalike.recognize.knn", "lookalike.serve.app"} <= names
    assert "lookalike.labels" in names


def test_no_lower_floor_imports_the_evaluation() -> None:
    offenders = {
        module_name(path): found
        for path in lower_modules()
        if (found := evaluation_imports(path.read_text(), module_name(path), path.name == "__init__.py"))
    }
    assert offenders == {}


@pytest.mark.parametrize(
    ("source", "name"),
    [
        ("from lookalike.evaluate.datasets import labelled_folder", "lookalike.collection.fitting"),
        ("import lookalike.evaluate.ladder as ladder", "lookalike.recognize.knn"),
        ("from lookalike import evaluate", "lookalike.serve.app"),
        ("from ..evaluate import splits", "lookalike.recognize.knn"),
        ("def f():\n    from ...evaluate.ladder import run_ladder", "lookalike.serve.static.x"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import lookalike.evaluate",
            "lookalike.labels",
        ),
        ("import importlib\nimportlib.import_module('lookalike.evaluate.spaces')", "lookalike.serve.app"),
    ],
)
def test_the_check_finds_an_evaluation_import(source: str, name: str) -> None:
    assert evaluation_imports(source, name)


@pytest.mark.parametrize(
    "source",
    [
        "from lookalike.labels import labelled_folder",
        "from lookalike.recognize.knn import KnnClassifier",
        "from . import knn",
        "import lookalike.evaluation_notes",  # a name that only starts like the package
    ],
)
def test_the_check_passes_product_imports(source: str) -> None:
    assert evaluation_imports(source, "lookalike.recognize.multiscale") == []
