"""`lookalike describe` and `lookalike classify`: descriptors and ImageNet labels of image files."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import typer
from rich.table import Table

from lookalike.atomic import save_npz_atomic
from lookalike.cli.common import (
    console,
    errors,
    lines_wanted,
    print_json,
    progress_bar,
    reported_errors,
    wants_progress,
)
from lookalike.cli.options import IMSIZE, MODEL, POOLING, PRECISION, SCALES, parse_scales
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.walk import expand_inputs


def settings_from_options(
    model: str, pooling: str | None, scales: str, imsize: int, precision: str
) -> DescriptorSettings:
    return DescriptorSettings(
        model=model, pooling=pooling, scales=parse_scales(scales), imsize=imsize, precision=precision
    )


def describe(
    inputs: list[Path] = typer.Argument(..., help="Image files and folders (walked recursively)."),
    out: Path = typer.Option(
        ..., "--out", "-o", help="Output .npz with `vectors` (N, D) float32 and `paths`."
    ),
    model: str = MODEL,
    pooling: str = POOLING,
    scales: str = SCALES,
    imsize: int = IMSIZE,
    precision: str = PRECISION,
    batch_size: int = typer.Option(8, "--batch-size", help="Same-size images run through the net together."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no table."),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON summary."),
) -> None:
    """Compute a global descriptor for every image; unreadable files are reported and skipped."""
    with reported_errors():
        paths = list(expand_inputs(inputs))
        extractor = Extractor(settings_from_options(model, pooling, scales, imsize, precision))
        vectors, kept, failed = [], [], []
        started = time.perf_counter()
        with progress_bar(wants_progress(quiet, as_json)) as bar:
            task = bar.add_task("describing", total=len(paths), rate="") if bar else None
            for done, result in enumerate(extractor.describe_files(paths, batch_size=batch_size), 1):
                if result.vector is None:
                    failed.append(
                        {"path": str(result.path), "error": result.error.reason if result.error else "?"}
                    )
                else:
                    vectors.append(result.vector)
                    kept.append(str(result.path))
                if bar is not None and task is not None:
                    rate = done / max(time.perf_counter() - started, 1e-9)
                    bar.update(task, advance=1, rate=f"{rate:.1f} img/s")
        seconds = time.perf_counter() - started
        matrix = np.stack(vectors) if vectors else np.zeros((0, extractor.dim), np.float32)
        save_npz_atomic(out, vectors=matrix, paths=np.array(kept, dtype=str))
        summary = {
            "described": len(kept),
            "failed": failed,
            "dim": extractor.dim,
            "precision": extractor.precision,
            "seconds": round(seconds, 3),
            "out": str(out),
        }
        if as_json:
            print_json(summary)
        elif not quiet:
            console.print(
                f"described {len(kept)} images ({extractor.dim}-D, {extractor.precision}) "
                f"in {seconds:.1f} s → {out}",
                highlight=False,
            )
            for failure in failed:
                errors.print(f"[yellow]skipped[/] {failure['path']}: {failure['error']}", highlight=False)


def classify(
    image: Path = typer.Argument(..., help="An image file."),
    model: str = MODEL,
    top: int = typer.Option(5, "--top", "-k"),
    as_json: bool = typer.Option(False, "--json", help="One JSON line (what a pipe gets)."),
) -> None:
    """ImageNet top-k labels of an image: a quick proof that a model's weights are loaded right."""
    from lookalike.classify import classify_image

    with reported_errors():
        predictions = classify_image(image, model, top)
    if lines_wanted(as_json):
        print_json({"image": str(image), "model": model, "top": predictions})
        return
    table = Table(title=f"{image.name} — {model}")
    table.add_column("label")
    table.add_column("probability", justify="right")
    for label, probability in predictions:
        table.add_row(label, f"{probability:.3f}")
    console.print(table)
