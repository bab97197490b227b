"""The recognition protocol as an evaluation: multi-scale descriptors of a labelled folder with a clutter
class (extracted in cached chunks), the distractor splits of :mod:`lookalike.evaluate.splits` and the
ladder of :mod:`lookalike.evaluate.ladder`, from 1-NN to the pairwise verifier."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lookalike.errors import ConfigError
from lookalike.evaluate.extraction import extract_variants
from lookalike.evaluate.ladder import LadderResult, LadderRow, run_ladder
from lookalike.evaluate.protocols import CALTECH_DISTRACTOR
from lookalike.evaluate.splits import (
    TINI_OBJECT_QUERIES,
    RecognitionSplit,
    distractor_splits,
    object_query_count,
)
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.labels import LabelledImages, labelled_folder
from lookalike.recognize.features import LocalFeatureCache
from lookalike.recognize.multiscale import DEFAULT_SCALES
from lookalike.registry import get_model_config

RECOGNITION = "recognition"  # the protocol's name for `lookalike evaluate`
CHUNK = 256  # each chunk is cached on its own: an interrupted extraction resumes at the last chunk

Progress = Callable[[str, int, int], None]


@dataclass(frozen=True)
class RecognitionProtocol:
    """How the protocol is drawn: the ``distractor`` folder, ``object_queries`` of the 86.5 % split (one
    per class), and the validation and verifier-training folds (``folds``, ``heldout`` pseudo-distractor
    classes, ``train_queries`` object and as many pseudo-distractor queries per training fold); ``local``
    adds SIFT/ORB inliers to the verifier."""

    distractor: str = CALTECH_DISTRACTOR
    object_queries: int = TINI_OBJECT_QUERIES
    folds: int = 3
    heldout: int = 20
    train_queries: int = 300
    local: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if min(self.object_queries, self.folds, self.heldout, self.train_queries) < 1:
            raise ConfigError("object_queries, folds, heldout and train_queries must all be ≥ 1")


@dataclass(frozen=True)
class SplitSize:
    """How many distractor and object queries and references a test split has."""

    distractors: int
    objects: int
    references: int


@dataclass(frozen=True)
class RecognitionReport:
    """The ladder of one model on one dataset, with the extraction time per image (all scales)."""

    data: str
    model: str
    pooling: str
    imsize: int
    scales: tuple[float, ...]
    images: int
    unreadable: int
    splits: dict[str, SplitSize]
    ladder: LadderResult
    extract_seconds_per_image: float
    ladder_seconds: float

    def summary(self, variant: str) -> list[LadderRow]:
        """The selected configuration of each stage of ``variant``, in ladder order."""
        return self.ladder.summary(variant)

    def as_dict(self) -> dict:
        """A JSON-ready record: the settings, the split sizes and the selected row of every stage."""
        return {
            "protocol": RECOGNITION,
            "data": self.data,
            "model": self.model,
            "pooling": self.pooling,
            "imsize": self.imsize,
            "scales": list(self.scales),
            "images": self.images,
            "unreadable": self.unreadable,
            "extract_ms_per_image": 1000 * self.extract_seconds_per_image,
            "ladder_seconds": self.ladder_seconds,
            "verifier_pairs": self.ladder.verifier_pairs,
            "splits": {
                name: {**asdict(size), "stages": [row_record(r) for r in self.summary(name)]}
                for name, size in self.splits.items()
            },
        }


def row_record(row: LadderRow) -> dict:
    """One ladder row as a JSON-ready dict."""
    return {
        "stage": row.stage,
        "description": row.description,
        "config": row.config.record(),
        "validation": asdict(row.validation),
        "test": asdict(row.test),
        "selected": row.selected,
    }


def multiscale_descriptors(
    extractor: Extractor,
    paths: Sequence[Path],
    pooling: str,
    progress: Progress | None = None,
    chunk: int = CHUNK,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Descriptors ``(N, S, D)`` of ``paths`` at the extractor's scales for ``pooling``, the mask of
    unreadable images and the mean backbone seconds per image over all scales.

    Chunks of ``chunk`` images go through :func:`~lookalike.evaluate.extraction.extract_variants`, which
    caches every pooling of a chunk: a rerun, another pooling or an interrupted run reuses what is there.
    """
    vectors, failed, seconds = [], [], []
    for start in range(0, len(paths), chunk):
        part = extract_variants(extractor, paths[start : start + chunk])
        vectors.append(part.vectors[pooling])
        failed.append(part.failed)
        seconds.append(float(part.seconds_per_scale.sum()))
        if progress is not None:
            progress("describing", min(start + chunk, len(paths)), len(paths))
    if not vectors:
        raise ConfigError("no images to describe")
    return np.concatenate(vectors), np.concatenate(failed), float(np.mean(seconds))


def describe_folder(
    data: str | Path,
    distractor: str,
    model: str,
    pooling: str,
    imsize: int,
    precision: str,
    progress: Progress | None = None,
) -> tuple[LabelledImages, np.ndarray, np.ndarray, float]:
    """The labelled folder ``data`` and :func:`multiscale_descriptors` of all its images at
    :data:`~lookalike.recognize.multiscale.DEFAULT_SCALES`: what the protocol extracts (and caches)."""
    dataset = labelled_folder(data, distractor=distractor)
    settings = DescriptorSettings(model=model, scales=DEFAULT_SCALES, imsize=imsize, precision=precision)
    x, failed, seconds = multiscale_descriptors(Extractor(settings), dataset.paths, pooling, progress)
    return dataset, x, failed, seconds


def split_sizes(dataset: LabelledImages, splits: dict[str, RecognitionSplit]) -> dict[str, SplitSize]:
    out = {}
    for name, split in splits.items():
        objects = object_query_count(dataset.labels, split)
        out[name] = SplitSize(len(split.queries) - objects, objects, len(split.references))
    return out


def evaluate_recognition(
    data: str | Path,
    model: str,
    pooling: str | None = None,
    imsize: int = 1024,
    precision: str = "auto",
    protocol: RecognitionProtocol | None = None,
    progress: Progress | None = None,
) -> RecognitionReport:
    """Run the distractor-heavy recognition protocol on the labelled folder ``data``.

    Every readable image is described at :data:`~lookalike.recognize.multiscale.DEFAULT_SCALES` with
    ``pooling`` (default: the model's own), unreadable ones are left out (and counted), then
    :func:`~lookalike.evaluate.ladder.run_ladder` runs on the 86.5 % and 50 % splits. ``progress``
    receives ``("describing", done, total)`` and ``("ladder", stages done, stages)``.
    """
    protocol = protocol or RecognitionProtocol()
    pooling = pooling or get_model_config(model).pooling
    dataset, x, failed, seconds = describe_folder(
        data, protocol.distractor, model, pooling, imsize, precision, progress
    )
    kept = np.flatnonzero(~failed)
    images = dataset.subset(kept)
    splits = distractor_splits(images, protocol.object_queries, protocol.seed)
    started = time.perf_counter()
    result = run_ladder(
        x[kept],
        images,
        splits,
        local=LocalFeatureCache() if protocol.local else None,
        folds=protocol.folds,
        heldout=protocol.heldout,
        train_queries=protocol.train_queries,
        seed=protocol.seed,
        progress=progress,
    )
    return RecognitionReport(
        data=str(Path(data)),
        model=model,
        pooling=pooling,
        imsize=imsize,
        scales=tuple(DEFAULT_SCALES),
        images=len(images),
        unreadable=int(failed.sum()),
        splits=split_sizes(images, splits),
        ladder=result,
        extract_seconds_per_image=seconds,
        ladder_seconds=time.perf_counter() - started,
    )


__all__ = [
    "CHUNK",
    "RECOGNITION",
    "RecognitionProtocol",
    "RecognitionReport",
    "SplitSize",
    "describe_folder",
    "evaluate_recognition",
    "multiscale_descriptors",
    "row_record",
]
