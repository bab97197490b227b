"""`lookalike check -c COL [--repair]`: find damage in a collection, and repair what can be rebuilt."""

from __future__ import annotations

from pathlib import Path

import typer

from lookalike.cli.collections import COLLECTION, JSON, collection_path
from lookalike.cli.common import console, errors, print_json, reported_errors
from lookalike.collection.check import check_collection


def check(
    collection: Path = COLLECTION,
    repair: bool = typer.Option(
        False, "--repair", help="Rebuild the index, re-extract damaged descriptors, record missing checksums."
    ),
    as_json: bool = JSON,
) -> None:
    """Verify a collection (database, descriptors, index, whitening, files); exit 1 if damage remains."""
    with reported_errors():
        report = check_collection(collection_path(collection), repair=repair)
    if as_json:
        print_json(report.as_dict())
    else:
        checked = ", ".join(f"{count} {part}" for part, count in report.checked.items())
        console.print(f"checked {report.path}: {checked or 'the database'}", highlight=False)
        for finding in report.findings:
            label = "[red]damaged[/]" if finding.damage else "[yellow]note[/]"
            target = errors if finding.damage and finding.repair is None else console
            target.print(f"{label} {finding.part}: {finding.problem}", highlight=False)
            if finding.repair:
                console.print(f"  [green]repaired[/] {finding.repair}", highlight=False)
        if report.damaged:
            errors.print("damage remains" + ("" if repair else ": run again with --repair"), highlight=False)
        else:
            console.print("no damage" + (" left" if report.findings else ""), highlight=False)
    if report.damaged:
        raise typer.Exit(1)
