"""Export a collection for other tools: ``descriptors.npy`` + ``images.csv`` (see docs/formats.md)."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Protocol

import numpy as np

from lookalike.atomic import atomic_write
from lookalike.collection.store import ImageRecord
from lookalike.whitening import Whitening

CSV_COLUMNS = ("index", "id", "path", "width", "height", "sha256")


class Exported(Protocol):
    """What an export reads of a collection."""

    @property
    def whitening(self) -> Whitening | None: ...

    def raw_vectors(self) -> tuple[np.ndarray, np.ndarray]: ...

    def records(self, ids: list[int]) -> dict[int, ImageRecord]: ...

    def prepare(self, raw: np.ndarray) -> np.ndarray: ...


def export_collection(collection: Exported, folder: str | Path) -> dict[str, Path]:
    """Row i of ``descriptors.npy`` (N, D) float32 is the image on line i of ``images.csv``.

    With whitening, ``descriptors_whitened.npy`` holds what the index searches. Files are written atomically.
    """
    folder = Path(folder)
    ids, raw = collection.raw_vectors()
    records = collection.records([int(i) for i in ids])
    written = {"descriptors": folder / "descriptors.npy", "images": folder / "images.csv"}
    with atomic_write(written["descriptors"]) as handle:
        np.save(handle, np.asarray(raw, dtype=np.float32), allow_pickle=False)
    if collection.whitening is not None:
        written["descriptors_whitened"] = folder / "descriptors_whitened.npy"
        with atomic_write(written["descriptors_whitened"]) as handle:
            np.save(handle, collection.prepare(raw), allow_pickle=False)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(CSV_COLUMNS)
    for index, image_id in enumerate(ids):
        record = records[int(image_id)]
        writer.writerow((index, record.id, record.path, record.width, record.height, record.sha256))
    with atomic_write(written["images"], "w") as handle:
        handle.write(text.getvalue())
    return written
