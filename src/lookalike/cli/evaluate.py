"""`lookalike evaluate`: a retrieval protocol for one descriptor setting (descriptors cached per setting)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.progress import TaskID
from rich.table import Table

from lookalike.atomic import atomic_write
from lookalike.cli.common import console, print_json, progress_bar, reported_errors, wants_progress
from lookalike.evaluate import protocols
from lookalike.evaluate.run import Variant, evaluate
from lookalike.registry import DEFAULT_MODEL, get_model_config


def evaluate_command(
    protocol: str = typer.Argument(..., help=f"One of: {', '.join(protocols.PROTOCOLS)}."),
    data: Path = typer.Option(..., "--data", help="The dataset folder (read in place)."),
    gnd: Path = typer.Option(None, "--gnd", help="revisitop ground truth (gnd_*.pkl or .json)."),
    split: str = typer.Option(
        "heldout", "--split", help="caltech101: heldout (whitening on other classes) or all."
    ),
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m"),
    pooling: list[str] = typer.Option(
        [], "--pooling", help="mac, spoc, rmac, gem; repeat for several (default: the model's own)."
    ),
    scales: list[str] = typer.Option(
        ["single"], "--scales", help="single or ms (1, 1/√2, 1/2); repeat for both."
    ),
    whiten: list[str] = typer.Option(["none"], "--whiten", help="none, pca or learned; repeat for several."),
    rerank: list[str] = typer.Option(
        ["none"],
        "--rerank",
        help="none, aqe, dba or dba+aqe (αQE / DBA with n = 2, α = 3); repeat for several.",
    ),
    imsize: int = typer.Option(1024, "--imsize"),
    precision: str = typer.Option("auto", "--precision"),
    out: Path = typer.Option(None, "--out", "-o", help="Write the results as JSON."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per variant."),
) -> None:
    """mAP (Easy/Medium/Hard for revisitop), mP@1/5/10 and extract time per image, per variant."""
    with reported_errors():
        for value in scales:
            if value not in ("single", "ms"):
                raise typer.BadParameter(f"--scales takes single or ms, got {value!r}")
        poolings = pooling or [get_model_config(model).pooling]
        variants = [
            Variant(p, s == "ms", w, r) for p in poolings for s in scales for w in whiten for r in rerank
        ]
        evalset = protocols.build(protocol, data, gnd, split)
        with progress_bar(wants_progress(quiet, as_json)) as bar:
            tasks: dict[str, TaskID] = {}

            def update(stage: str, done: int, total: int) -> None:
                if bar is None:
                    return
                if stage not in tasks:
                    tasks[stage] = bar.add_task(f"describing {stage}", total=total, rate="")
                bar.update(tasks[stage], completed=done)

            results = evaluate(evalset, model, variants, imsize=imsize, precision=precision, progress=update)
    records = [r.as_dict() for r in results]
    if out is not None:
        with atomic_write(out, "w") as handle:
            json.dump(records, handle, indent=1)
    if as_json:
        for record in records:
            print_json(record)
        return
    if quiet:
        return
    table = Table(
        title=f"{evalset.name}: {len(evalset.gnd)} queries, {len(evalset.images)} images — {model} @ {imsize}"
    )
    for column in ("variant", "mAP", "E / M / H", "mP@1", "mP@5", "mP@10", "N-S", "ms/image"):
        table.add_column(column, justify="left" if column == "variant" else "right")
    for r in results:
        emh = (
            " / ".join(f"{100 * r.revisited[s]['map']:.1f}" for s in ("easy", "medium", "hard"))
            if r.revisited
            else ""
        )
        table.add_row(
            r.variant.label,
            f"{100 * r.map:.2f}",
            emh,
            *(f"{100 * r.mp_at_k[k]:.1f}" for k in (1, 5, 10)),
            f"{r.ukbench_ns:.2f}" if r.ukbench_ns is not None else "",
            f"{r.extract_ms_per_image:.0f}",
        )
    console.print(table)
