"""`lookalike recognize`: the label of an image by its nearest labelled neighbours in a collection."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lookalike.cli.collections import COLLECTION, JSON, collection_path, parse_bbox, parse_id
from lookalike.cli.common import console, print_json, reported_errors
from lookalike.collection import Collection
from lookalike.recognize.knn import METHODS, TRANSFORMS, Prediction
from lookalike.recognize.service import (
    DEFAULT_ALPHA,
    DEFAULT_K,
    DEFAULT_METHOD,
    DEFAULT_TRANSFORM,
    Recognizer,
    RecognizerOptions,
)

METHOD = typer.Option(DEFAULT_METHOD, "--method", help=f"Voting rule, one of: {', '.join(METHODS)}.")
K = typer.Option(DEFAULT_K, "-k", min=1, help="Neighbours that vote (1-NN uses 1).")
TRANSFORM = typer.Option(
    DEFAULT_TRANSFORM, "--transform", help=f"Similarity transform, one of: {', '.join(TRANSFORMS)}."
)
ALPHA = typer.Option(
    None, "--alpha", help=f"Expansion distance of --method alpha (default: {DEFAULT_ALPHA})."
)
WHITEN = typer.Option(
    "auto",
    "--whiten",
    help="PCA-whiten with the references: auto (when there are at least as many as dimensions), on, off.",
)
LABELS = typer.Option(
    None, "--labels", help="CSV of path,label (default: the first folder below the collection root)."
)


def recognize(
    images: list[str] = typer.Argument(..., help="Image files, indexed paths or id:N (one answer each)."),
    collection: Path = COLLECTION,
    method: str = METHOD,
    k: int = K,
    transform: str = TRANSFORM,
    alpha: float = ALPHA,
    labels: Path = LABELS,
    whiten: str = WHITEN,
    bbox: str = typer.Option(None, "--bbox", help="Crop the query to x0,y0,x1,y1 first."),
    as_json: bool = JSON,
) -> None:
    """Recognise images: label, confidence and the labelled neighbours that support it (JSON lines when
    piped or with --json)."""
    with reported_errors(), Collection.open(collection_path(collection), readonly=True) as opened:
        recognizer = RecognizerOptions(method, k, transform, alpha, labels, whiten).build(opened)
        for image in images:
            query: int | str = parse_id(image) if image.startswith("id:") else image
            show(image, recognizer, recognizer.recognize(query, parse_bbox(bbox)), as_json)


def show(image: str, recognizer: Recognizer, prediction: Prediction, as_json: bool) -> None:
    neighbours = [
        {
            "rank": rank,
            "id": n.id,
            "path": recognizer.path(n.id),
            "label": n.label,
            "similarity": round(n.similarity, 6),
        }
        for rank, n in enumerate(prediction.neighbours, start=1)
    ]
    if as_json or not console.is_terminal:
        print_json(
            {
                "query": image,
                "label": prediction.label,
                "confidence": round(prediction.confidence, 6),
                "method": recognizer.method,
                "neighbours": neighbours,
            }
        )
        return
    console.print(
        f"[bold]{prediction.label}[/] (confidence {prediction.confidence:.4f}, {recognizer.method})",
        highlight=False,
    )
    table = Table(title=f"{image} — supporting neighbours")
    for column in ("rank", "similarity", "label", "path"):
        table.add_column(column, justify="right" if column in ("rank", "similarity") else "left")
    for n in neighbours:
        table.add_row(str(n["rank"]), f"{n['similarity']:.4f}", str(n["label"]), str(n["path"]))
    console.print(table)
