"""`lookalike evaluate`: a retrieval protocol for one descriptor setting (descriptors cached per setting),
or the recognition protocol (the ladder from 1-NN to the pairwise verifier)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from lookalike.atomic import atomic_write
from lookalike.cli.common import console, print_json, progress_bar, reported_errors, wants_progress
from lookalike.evaluate import protocols
from lookalike.evaluate.recognition import (
    RECOGNITION,
    RecognitionProtocol,
    RecognitionReport,
    evaluate_recognition,
)
from lookalike.evaluate.run import Variant, evaluate
from lookalike.registry import DEFAULT_MODEL, get_model_config


def evaluate_command(
    protocol: str = typer.Argument(..., help=f"One of: {', '.join((*protocols.PROTOCOLS, RECOGNITION))}."),
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
    distractor: str = typer.Option(
        protocols.CALTECH_DISTRACTOR, "--distractor", help="recognition: the clutter sub-folder."
    ),
    object_queries: int = typer.Option(
        RecognitionProtocol.object_queries,
        "--object-queries",
        help="recognition: object queries of the 86.5% split.",
    ),
    folds: int = typer.Option(RecognitionProtocol.folds, "--folds", help="recognition: validation folds."),
    heldout: int = typer.Option(
        RecognitionProtocol.heldout, "--heldout", help="recognition: classes playing distractors in a fold."
    ),
    train_queries: int = typer.Option(
        RecognitionProtocol.train_queries, "--train-queries", help="recognition: verifier-training queries."
    ),
    no_local: bool = typer.Option(False, "--no-local", help="recognition: verifier without SIFT inliers."),
) -> None:
    """mAP (Easy/Medium/Hard for revisitop), mP@1/5/10 and extract time per image, per variant; or, for
    ``recognition``, GAP and accuracy of every stage of the ladder on the 86.5 % and 50 % distractor splits."""
    if protocol == RECOGNITION:
        with reported_errors():
            if len(pooling) > 1 or gnd is not None or {*scales, *whiten, *rerank} != {"single", "none"}:
                raise typer.BadParameter(
                    "the recognition protocol takes one --pooling and no --gnd, --scales, --whiten or "
                    "--rerank (it describes 5 scales and chooses its own whitening)"
                )
            settings = RecognitionProtocol(
                distractor, object_queries, folds, heldout, train_queries, local=not no_local
            )
            with progress_bar(wants_progress(quiet, as_json)) as bar:
                report = evaluate_recognition(
                    data, model, pooling[0] if pooling else None, imsize, precision, settings, _updater(bar)
                )
        _show_recognition(report, out, quiet, as_json)
        return
    with reported_errors():
        if protocol not in protocols.PROTOCOLS:
            known = ", ".join((*protocols.PROTOCOLS, RECOGNITION))
            raise typer.BadParameter(f"unknown protocol {protocol!r}; expected one of {known}")
        for value in scales:
            if value not in ("single", "ms"):
                raise typer.BadParameter(f"--scales takes single or ms, got {value!r}")
        poolings = pooling or [get_model_config(model).pooling]
        variants = [
            Variant(p, s == "ms", w, r) for p in poolings for s in scales for w in whiten for r in rerank
        ]
        evalset = protocols.build(protocol, data, gnd, split)
        with progress_bar(wants_progress(quiet, as_json)) as bar:
            update = _updater(bar, "describing ")
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


def _updater(bar: Progress | None, prefix: str = "") -> Callable[[str, int, int], None]:
    """A progress callback that keeps one task per stage of ``bar`` (nothing when there is no bar)."""
    tasks: dict[str, TaskID] = {}

    def update(stage: str, done: int, total: int) -> None:
        if bar is None:
            return
        if stage not in tasks:
            tasks[stage] = bar.add_task(prefix + stage, total=total, rate="")
        bar.update(tasks[stage], completed=done)

    return update


def _show_recognition(report: RecognitionReport, out: Path | None, quiet: bool, as_json: bool) -> None:
    record = report.as_dict()
    if out is not None:
        with atomic_write(out, "w") as handle:
            json.dump(record, handle, indent=1, ensure_ascii=False)
    if as_json:
        print_json(record)
        return
    if quiet:
        return
    for variant, size in report.splits.items():
        table = Table(
            title=f"{variant} distractors: {size.distractors} distractor + {size.objects} object queries, "
            f"{size.references} references — {report.model}, {report.pooling} @ {report.imsize}"
        )
        for column in ("stage", "chosen on validation", "val GAP", "GAP", "accuracy", "vs 1-NN"):
            table.add_column(
                column, justify="left" if column in ("stage", "chosen on validation") else "right"
            )
        rows = report.summary(variant)
        first = rows[0].test.gap
        for row in rows:
            change = f"{100 * (row.test.gap / first - 1):+.1f} %" if first > 0 else ""
            table.add_row(
                row.stage,
                row.description,
                f"{row.validation.gap:.3f}",
                f"{row.test.gap:.3f}",
                f"{row.test.accuracy:.3f}",
                change,
            )
        console.print(table)
