"""`lookalike recognize`: the label of an image by its nearest labelled neighbours in a collection."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from lookalike.cli.collections import COLLECTION, JSON, collection_path, parse_bbox, parse_id
from lookalike.cli.common import console, lines_wanted, print_json, reported_errors
from lookalike.cli.options import recognition_options
from lookalike.collection import Collection
from lookalike.recognize.knn import Prediction
from lookalike.recognize.service import Recognizer, RecognizerOptions


@recognition_options
def recognize(
    images: list[str] = typer.Argument(..., help="Image files, indexed paths or id:N (one answer each)."),
    collection: Path = COLLECTION,
    recognition: RecognizerOptions = RecognizerOptions(),
    bbox: str = typer.Option(None, "--bbox", help="Crop the query to x0,y0,x1,y1 first."),
    as_json: bool = JSON,
) -> None:
    """Recognise images: label, confidence and the labelled neighbours that support it (JSON lines when
    piped or with --json)."""
    with reported_errors(), Collection.open(collection_path(collection), readonly=True) as opened:
        recognizer = recognition.build(opened)
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
    if lines_wanted(as_json):
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
