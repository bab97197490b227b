"""Recognition over a collection: the indexed images with a label are the references of a kNN classifier.

Labels come from the first folder component of each image's path relative to the collection root
(``cats/2019/a.jpg`` → ``cats``; an image directly in the root, or outside it, has none), or from a CSV of
``path,label`` rows (a header row ``path,label`` is skipped; paths as indexed, i.e. relative to the root, or
absolute). Images without a label are not references. The stored descriptors are used as the collection
searches them (whitened if the collection has a whitening), so nothing is described again except the query.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.collection import Collection
from lookalike.collection.query import BBox, query_vector
from lookalike.errors import ConfigError, NoReferencesError
from lookalike.recognize.knn import KnnClassifier, Neighbour, Prediction, Transform

_log = logging.getLogger(__name__)

Query = np.ndarray | Image.Image | int | str | Path


def folder_label(path: str) -> str | None:
    """The first folder of a path relative to the collection root; None for files in the root or absolute."""
    parts = Path(path).parts
    if Path(path).is_absolute() or len(parts) < 2:
        return None
    return parts[0]


def read_labels(path: str | Path) -> dict[str, str]:
    """``path → label`` from a CSV of ``path,label`` rows; a ``path,label`` header is skipped."""
    labels: dict[str, str] = {}
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            for number, row in enumerate(csv.reader(handle), start=1):
                if not row or (number == 1 and [c.strip().lower() for c in row] == ["path", "label"]):
                    continue
                if len(row) != 2 or not row[0].strip() or not row[1].strip():
                    raise ConfigError(f"{path}:{number}: expected 'path,label', got {row!r}")
                labels[row[0].strip()] = row[1].strip()
    except OSError as exc:
        raise ConfigError(f"cannot read labels from {path}: {exc}") from exc
    return labels


# The best single-scale configuration of benchmarks/recognition.py (RESULTS.md): k-NN, x, k = 7, whitened.
DEFAULT_METHOD = "knn"
DEFAULT_K = 7
DEFAULT_TRANSFORM = "identity"
DEFAULT_ALPHA = 0.9
WHITEN_CHOICES = ("auto", "on", "off")


def should_whiten(whiten: str, references: int, dim: int) -> bool:
    """``auto`` whitens when there are at least as many references as dimensions: fewer cannot estimate a
    D×D covariance, and the whitening would mostly amplify noise."""
    if whiten not in WHITEN_CHOICES:
        raise ConfigError(f"whiten must be one of {', '.join(WHITEN_CHOICES)}, got {whiten!r}")
    return whiten == "on" or (whiten == "auto" and references >= dim)


@dataclass(frozen=True)
class RecognizerOptions:
    """How a :class:`Recognizer` votes and where its labels come from, as one value (the CLI and the server
    pass it along). ``alpha`` is used by method ``"alpha"`` only and defaults to ``DEFAULT_ALPHA`` there;
    ``k`` is ignored by ``"1nn"``."""

    method: str = DEFAULT_METHOD
    k: int = DEFAULT_K
    transform: str = DEFAULT_TRANSFORM
    alpha: float | None = None
    labels: str | Path | None = None
    whiten: str = "auto"

    def __post_init__(self) -> None:
        if self.alpha is not None and self.method != "alpha":
            raise ConfigError("alpha is used by method 'alpha' only")

    def build(self, collection: Collection) -> Recognizer:
        return Recognizer(
            collection,
            method=self.method,
            k=None if self.method == "1nn" else self.k,
            transform=self.transform,
            labels=self.labels,
            alpha=(DEFAULT_ALPHA if self.alpha is None else self.alpha) if self.method == "alpha" else None,
            whiten=self.whiten,
        )


class Recognizer:
    """kNN recognition with a collection's labelled images as references.

    ``method``, ``k``, ``transform`` and ``alpha`` are those of
    :class:`~lookalike.recognize.knn.KnnClassifier`. ``labels`` is None (folder names), a mapping of paths
    to labels, or a CSV file. ``whiten`` ("auto", "on", "off") PCA-whitens references and queries with a
    whitening fitted on the references (see :func:`should_whiten`); the neighbours' similarities are then
    those of the whitened space. The neighbours of a :class:`~lookalike.recognize.knn.Prediction` carry
    collection image ids; :meth:`path` names their files.
    """

    def __init__(
        self,
        collection: Collection,
        method: str = DEFAULT_METHOD,
        k: int | None = DEFAULT_K,
        transform: str | Transform = DEFAULT_TRANSFORM,
        labels: Mapping[str, str] | str | Path | None = None,
        alpha: float | None = None,
        whiten: str = "auto",
    ) -> None:
        self.collection = collection
        given = read_labels(labels) if isinstance(labels, str | Path) else labels
        ids, raw = collection.raw_vectors()
        records = collection.records([int(i) for i in ids])
        if given is not None:
            given = {self._name(p): label for p, label in given.items()}
        keep, names = [], []
        for row, image_id in enumerate(ids):
            record = records[int(image_id)]
            label = given.get(record.path) if given is not None else folder_label(record.path)
            if label is not None:
                keep.append(row)
                names.append(label)
        if not keep:
            raise NoReferencesError(
                f"no indexed image of {collection.path} has a label: put the references in one folder per "
                "class below the collection root, or pass a CSV of path,label"
            )
        self.method = method
        self.transform = transform if isinstance(transform, str) else getattr(transform, "__name__", "custom")
        self.image_ids = ids[keep]
        self.labels = tuple(names)
        self.paths = {int(i): records[int(i)].path for i in self.image_ids}
        self.whitened = should_whiten(whiten, len(keep), raw.shape[1])
        self.classifier = KnnClassifier(method, 1 if method == "1nn" else k, transform, alpha, self.whitened)
        self.classifier.fit(collection.prepare(raw[keep]), names)
        _log.info(
            "recognizer: %d labelled references in %d classes, %d unlabelled images ignored, %s",
            len(keep),
            len(set(names)),
            len(ids) - len(keep),
            "PCA-whitened" if self.whitened else "not whitened",
        )

    def _name(self, path: str) -> str:
        """A CSV path as the collection names it."""
        record = self.collection.record(path)
        return record.path if record is not None else path

    @property
    def classes(self) -> list[str]:
        """The labels of the references, sorted."""
        return sorted(set(self.labels))

    def path(self, image_id: int) -> str:
        """The indexed path of a reference image."""
        return self.paths[int(image_id)]

    def recognize(self, query: Query, bbox: BBox | None = None) -> Prediction:
        """The label of an image, an image file, an indexed image id or a raw descriptor."""
        raw = query_vector(self.collection, query, bbox)
        prediction = self.classifier.predict(self.collection.prepare(raw[None]))[0]
        neighbours = tuple(
            Neighbour(int(self.image_ids[n.id]), n.label, n.similarity) for n in prediction.neighbours
        )
        return Prediction(prediction.label, prediction.confidence, neighbours)


__all__ = ["Recognizer", "RecognizerOptions", "folder_label", "read_labels", "should_whiten"]
