"""What every command shares: consoles, error display, progress bars that stay quiet in scripts, and the
rule that a table is for a terminal only (:func:`lines_wanted`)."""

from __future__ import annotations

import json
import logging
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from lookalike.errors import LookalikeError

console = Console(soft_wrap=not Console().is_terminal)
errors = Console(stderr=True, soft_wrap=not Console(stderr=True).is_terminal)


def fail(message: str, code: int = 1) -> typer.Exit:
    errors.print(f"[bold red]error:[/] {message}", highlight=False)
    return typer.Exit(code)


@contextmanager
def reported_errors() -> Iterator[None]:
    """Show library errors as one clear message and a non-zero exit, never a traceback."""
    try:
        yield
    except LookalikeError as exc:
        raise fail(str(exc)) from exc
    except sqlite3.Error as exc:
        raise fail(f"collection database: {exc}; `lookalike check -c COLLECTION` says what is wrong") from exc
    except OSError as exc:
        raise fail(f"{exc.filename or 'file'}: {exc.strerror or exc}") from exc
    except KeyboardInterrupt as exc:
        raise fail("interrupted", 130) from exc


def print_json(record: Any) -> None:
    sys.stdout.write(json.dumps(record, ensure_ascii=False) + "\n")


def lines_wanted(as_json: bool) -> bool:
    """Whether a command prints JSON lines (one record per row) instead of a table: with ``--json``, or
    when stdout is not a terminal (a pipe, a file), where a table would wrap its cells across lines."""
    return as_json or not console.is_terminal


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(message)s"
    )


def wants_progress(quiet: bool, as_json: bool) -> bool:
    return not quiet and not as_json and errors.is_terminal


@contextmanager
def progress_bar(enabled: bool, unit: str = "images") -> Iterator[Progress | None]:
    if not enabled:
        yield None
        return
    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=errors, transient=False) as progress:
        yield progress
