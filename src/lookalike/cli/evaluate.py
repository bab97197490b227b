"""`lookalike evaluate retrieval PROTOCOL` (descriptor variants on a retrieval protocol, descriptors cached
per setting) and `lookalike evaluate recognition` (the ladder from 1-NN to the pairwise verifier)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.progress import Progress, TaskID
from rich.table import Table

from lookalike.atomic import atomic_write
from lookalike.cli.common import (
    console,
    lines_wanted,
    print_json,
    progress_bar,
    reported_errors,
    wants_progress,
)
from lookalike.cli.options import DEFAULT_SCALES, IMSIZE, MODEL, POOLING, PRECISION, one_of
from lookalike.evaluate import protocols
from lookalike.evaluate.recognition import RecognitionProtocol, RecognitionReport, evaluate_recognition
from lookalike.evaluate.run import WHITENINGS, EvalResult, Variant, evaluate
from lookalike.registry import get_model_config
from lookalike.rerank import registry_help

app = typer.Typer(
    help="Score descriptors on a retrieval protocol, or kNN recognition on a labelled folder.",
    no_args_is_help=True,
)

DATA = typer.Option(..., "--data", help="The dataset folder (read in place).")
OUT = typer.Option(None, "--out", "-o", help="Also write the results to this JSON file.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar, no table.")
JSON = typer.Option(False, "--json", help="JSON lines (what a pipe gets).")
RETRIEVAL_SCALES = ("single", "ms")


@app.command("retrieval")
def retrieval(
    protocol: str = typer.Argument(
        ...,
        metavar="PROTOCOL",
        help=f"One of: {', '.join(protocols.PROTOCOLS)}.",
        callback=one_of(protocols.PROTOCOLS),
    ),
    data: Path = DATA,
    gnd: Path = typer.Option(None, "--gnd", help="revisitop ground truth (gnd_*.pkl or .json)."),
    split: str = typer.Option(
        "heldout",
        "--split",
        help="caltech101: heldout (whitening on other classes) or all.",
        callback=one_of(("heldout", "all")),
    ),
    model: str = MODEL,
    pooling: list[str] = typer.Option(
        [], "--pooling", help="mac, spoc, rmac, gem; repeat for several (default: the model's own)."
    ),
    scales: list[str] = typer.Option(
        [DEFAULT_SCALES],
        "--scales",
        help="single or ms (1, 1/√2, 1/2); repeat for both.",
        callback=one_of(RETRIEVAL_SCALES),
    ),
    whiten: list[str] = typer.Option(
        [Variant.whitening],
        "--whiten",
        help=f"{', '.join(WHITENINGS)}; repeat for several.",
        callback=one_of(WHITENINGS),
    ),
    rerank: list[str] = typer.Option(
        [str(Variant.rerank)],
        "--rerank",
        help=f"A re-ranking chain such as none, aqe, dba,aqe or aqe:n=5; repeat for several. {registry_help()}",
    ),
    imsize: int = IMSIZE,
    precision: str = PRECISION,
    out: Path = OUT,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """mAP, mP@1/5/10 and extraction time of descriptor variants on a retrieval protocol.

    Every pooling × scales × whitening × re-ranking asked for is scored from one extraction (cached per
    setting); revisitop adds mAP Easy / Medium / Hard. A table in a terminal, one JSON line per variant
    when piped or with --json."""
    with reported_errors():
        poolings = pooling or [get_model_config(model).pooling]
        variants = [
            Variant(p, s == "ms", w, r) for p in poolings for s in scales for w in whiten for r in rerank
        ]
        evalset = protocols.build(protocol, data, gnd, split)
        with progress_bar(wants_progress(quiet, as_json)) as bar:
            update = _updater(bar, "describing ")
            results = evaluate(evalset, model, variants, imsize=imsize, precision=precision, progress=update)
    records = [r.as_dict() for r in results]
    _write(out, records)
    if quiet and not as_json:
        return
    if lines_wanted(as_json):
        for record in records:
            print_json(record)
        return
    title = f"{evalset.name}: {len(evalset.gnd)} queries, {len(evalset.images)} images — {model} @ {imsize}"
    console.print(_retrieval_table(title, results))


@app.command("recognition")
def recognition(
    data: Path = DATA,
    model: str = MODEL,
    pooling: str = POOLING,
    imsize: int = IMSIZE,
    precision: str = PRECISION,
    distractor: str = typer.Option(
        RecognitionProtocol.distractor, "--distractor", help="The clutter sub-folder (distractor queries)."
    ),
    object_queries: int = typer.Option(
        RecognitionProtocol.object_queries, "--object-queries", help="Object queries of the 86.5% split."
    ),
    folds: int = typer.Option(RecognitionProtocol.folds, "--folds", help="Validation folds."),
    heldout: int = typer.Option(
        RecognitionProtocol.heldout, "--heldout", help="Classes playing distractors in a fold."
    ),
    train_queries: int = typer.Option(
        RecognitionProtocol.train_queries, "--train-queries", help="Verifier-training queries."
    ),
    no_local: bool = typer.Option(False, "--no-local", help="Verifier without SIFT inliers."),
    out: Path = OUT,
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """GAP and accuracy of the recognition ladder, 1-NN to the pairwise verifier, on a labelled folder.

    The folder holds one sub-folder per class and a clutter folder (--distractor); the ladder is scored on
    its 86.5 % and 50 % distractor splits, with descriptors at 5 scales and whitening and hyper-parameters
    chosen on validation folds. A table per split in a terminal; one JSON line per stage of each split when
    piped or with --json (--out writes the whole report)."""
    with reported_errors():
        settings = RecognitionProtocol(
            distractor, object_queries, folds, heldout, train_queries, local=not no_local
        )
        with progress_bar(wants_progress(quiet, as_json)) as bar:
            report = evaluate_recognition(data, model, pooling, imsize, precision, settings, _updater(bar))
    record = report.as_dict()
    _write(out, record)
    if quiet and not as_json:
        return
    if lines_wanted(as_json):
        for row in _stage_lines(record):
            print_json(row)
        return
    for variant in report.splits:
        console.print(_recognition_table(report, variant))


def _write(out: Path | None, record: Any) -> None:
    if out is not None:
        with atomic_write(out, "w") as handle:
            json.dump(record, handle, indent=1, ensure_ascii=False)


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


def _retrieval_table(title: str, results: list[EvalResult]) -> Table:
    table = Table(title=title)
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
    return table


def _stage_lines(record: dict) -> list[dict]:
    """The report as rows, one per stage of each split: the split and the stage first, then the split's
    sizes and the run's settings (the report less its per-split stage lists, which the rows are)."""
    common = {key: value for key, value in record.items() if key != "splits"}
    rows = []
    for split, entry in record["splits"].items():
        sizes = {key: value for key, value in entry.items() if key != "stages"}
        rows += [{"split": split, **stage, **sizes, **common} for stage in entry["stages"]]
    return rows


def _recognition_table(report: RecognitionReport, variant: str) -> Table:
    size = report.splits[variant]
    table = Table(
        title=f"{variant} distractors: {size.distractors} distractor + {size.objects} object queries, "
        f"{size.references} references — {report.model}, {report.pooling} @ {report.imsize}"
    )
    for column in ("stage", "chosen on validation", "val GAP", "GAP", "accuracy", "vs 1-NN"):
        table.add_column(column, justify="left" if column in ("stage", "chosen on validation") else "right")
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
    return table
