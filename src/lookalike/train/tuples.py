"""Training tuples from labelled images: reading the set, sampling an epoch, mining hard negatives.

A training set is a folder whose sub-folders are the classes, or a CSV of ``path,label`` rows. Each epoch,
as in cirtorch (Radenović et al., TPAMI 2018), draws ``query_count`` queries and a random pool of
``pool_size`` images (cirtorch: 2,000 and 20,000), describes both with the current network and builds one
tuple per query: ``(query, positive, n_1 … n_N)`` as dataset indices, the negatives being the query's
nearest pool images of other classes, at most one per class. Descriptors are ``(N, D)`` L2-normalised
rows; "nearest" means the largest dot product, ties going to the lower pool index.
"""

from __future__ import annotations

import csv
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from lookalike.errors import ConfigError, ImageError, TrainingSetError
from lookalike.images import image_size
from lookalike.labels import folder_classes
from lookalike.train.losses import Targets

log = logging.getLogger(__name__)

DEFAULT_NEGATIVES = 5
_LISTED = 20  # class names an error message lists before "and N more"

PositiveRule = Literal["nearest", "random"]


@dataclass(frozen=True, eq=False)
class TrainingImages:
    """Readable training images and their classes.

    ``labels`` ``(N,)`` int64 indexes ``classes`` (sorted names); ``skipped`` lists the files left out and
    why — unreadable, or outside any class — so a caller can show them.
    """

    paths: tuple[Path, ...]
    labels: np.ndarray
    classes: tuple[str, ...]
    skipped: tuple[tuple[Path, str], ...] = ()

    def __len__(self) -> int:
        return len(self.paths)


def _listing(names: list[str]) -> str:
    shown = ", ".join(names[:_LISTED])
    return shown if len(names) <= _LISTED else f"{shown} and {len(names) - _LISTED} more"


def _training_images(
    pairs: list[tuple[Path, str]], skipped: list[tuple[Path, str]], source: str, check_images: bool
) -> TrainingImages:
    if check_images:
        readable = []
        for path, label in pairs:
            try:
                image_size(path)
            except ImageError as exc:
                skipped.append((path, exc.reason))
            else:
                readable.append((path, label))
        pairs = readable
    if skipped:
        log.warning("%s: %d files skipped, e.g. %s: %s", source, len(skipped), skipped[0][0], skipped[0][1])
    if not pairs:
        raise TrainingSetError(f"{source}: no readable images in any class")
    classes = sorted({label for _, label in pairs})
    if len(classes) < 2:
        raise TrainingSetError(
            f"{source}: training needs at least 2 classes, found only {_listing(classes)}", classes
        )
    index = {name: i for i, name in enumerate(classes)}
    labels = np.array([index[label] for _, label in pairs], dtype=np.int64)
    counts = np.bincount(labels, minlength=len(classes))
    single = [classes[i] for i in np.flatnonzero(counts < 2)]
    if single:
        raise TrainingSetError(
            f"{source}: every class needs at least 2 images (a query and its positive); "
            f"{len(single)} have one: {_listing(single)}",
            single,
        )
    return TrainingImages(tuple(p for p, _ in pairs), labels, tuple(classes), tuple(skipped))


def images_from_folder(root: str | Path, check_images: bool = True) -> TrainingImages:
    """Every image below ``root``, labelled with its top-level sub-folder's name.

    Images are found by extension and hidden files skipped (:func:`lookalike.walk.walk_images`); files
    directly in ``root`` belong to no class and are skipped. With ``check_images`` each header is read
    (:func:`lookalike.images.image_size`) and unreadable files are skipped too. Raises
    :class:`TrainingSetError` for fewer than 2 classes or a class of one image.
    """
    root = Path(root)
    pairs, loose = folder_classes(root)
    skipped = [(path, "directly in the training folder, not in a class sub-folder") for path in loose]
    return _training_images(pairs, skipped, str(root), check_images)


def images_from_csv(
    path: str | Path, root: str | Path | None = None, check_images: bool = True
) -> TrainingImages:
    """Images listed in a CSV of ``path,label`` rows (a first row ``path,label`` is a header).

    Relative paths are resolved against ``root``, by default the CSV's folder; blank lines are ignored and
    a row without exactly two non-empty fields raises :class:`TrainingSetError` with its line number.
    Missing and (with ``check_images``) unreadable files are skipped; the class rules are those of
    :func:`images_from_folder`.
    """
    path = Path(path)
    base = Path(root) if root is not None else path.parent
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise TrainingSetError(f"{path}: cannot read the CSV: {exc}") from exc
    pairs, skipped = [], []
    for line, row in enumerate(rows, start=1):
        fields = [field.strip() for field in row]
        if not any(fields):
            continue
        if line == 1 and [field.lower() for field in fields] == ["path", "label"]:
            continue
        if len(fields) != 2 or not all(fields):
            raise TrainingSetError(f"{path}, line {line}: expected 'path,label', got {row!r}")
        image = base / fields[0]
        if not check_images and not image.is_file():
            skipped.append((image, "file not found"))
        else:
            pairs.append((image, fields[1]))
    return _training_images(pairs, skipped, str(path), check_images)


# ---- mining --------------------------------------------------------------------------------------------------


def _check_described(desc: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    desc, labels = np.asarray(desc), np.asarray(labels)
    if desc.ndim != 2 or labels.shape != (desc.shape[0],):
        raise ConfigError(f"{what}: descriptors (N, D) need labels (N,), got {desc.shape} and {labels.shape}")
    if not np.isfinite(desc).all():
        raise ConfigError(f"{what} descriptors contain NaN or infinity")
    return desc, labels


def mine_hard_negatives(
    query_desc: np.ndarray,
    pool_desc: np.ndarray,
    query_labels: np.ndarray,
    pool_labels: np.ndarray,
    n_negatives: int = DEFAULT_NEGATIVES,
) -> np.ndarray:
    """Pool indices ``(Q, n_negatives)`` of each query's hardest negatives, as cirtorch mines them.

    Walking the pool from the most similar to the query down, an image is taken when its class differs
    from the query's and from every class taken before, until ``n_negatives`` are found. Scores are dot
    products; equal scores go to the lower pool index. A query whose pool holds fewer other classes gets
    ``-1`` in the slots left over.
    """
    query_desc, query_labels = _check_described(query_desc, query_labels, "queries")
    pool_desc, pool_labels = _check_described(pool_desc, pool_labels, "pool")
    if query_desc.shape[1] != pool_desc.shape[1]:
        raise ConfigError(f"queries of {query_desc.shape[1]} dimensions, pool of {pool_desc.shape[1]}")
    if n_negatives < 1:
        raise ConfigError(f"n_negatives must be at least 1, got {n_negatives}")
    scores = query_desc.astype(np.float64) @ pool_desc.astype(np.float64).T
    chosen = np.full((query_desc.shape[0], n_negatives), -1, dtype=np.int64)
    for q in range(query_desc.shape[0]):
        order = np.argsort(-scores[q], kind="stable")
        order = order[pool_labels[order] != query_labels[q]]
        _, first = np.unique(pool_labels[order], return_index=True)
        picked = order[np.sort(first)[:n_negatives]]
        chosen[q, : picked.size] = picked
    return chosen


def _class_members(labels: np.ndarray) -> dict[int, np.ndarray]:
    order = np.argsort(labels, kind="stable")
    values, starts = np.unique(labels[order], return_index=True)
    return {int(v): members for v, members in zip(values, np.split(order, starts[1:]), strict=True)}


def choose_positives(
    queries: np.ndarray,
    query_desc: np.ndarray | None,
    described: np.ndarray,
    described_desc: np.ndarray | None,
    labels: np.ndarray,
    rule: PositiveRule = "nearest",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """A positive (dataset index) for each query (dataset indices ``queries`` ``(Q,)``).

    ``labels`` ``(N,)`` are the whole dataset's. ``"nearest"``: the most similar image of the query's class
    among the ``described`` images (dataset indices, descriptors ``described_desc``; both descriptor
    arrays may be ``None`` for ``"random"``), the query itself
    excluded, ties to the lower dataset index; a query with no described classmate falls back to
    ``"random"``. ``"random"``: a uniformly drawn other image of its class from the whole dataset
    (``rng`` required). The default picks, like cirtorch's fixed pairs from verified matches, a positive
    that really shows what the query shows, even in broad or noisy classes; ``"random"`` gives harder,
    more varied positives.
    """
    if rule not in ("nearest", "random"):
        raise ConfigError(f"unknown positive rule {rule!r}; use 'nearest' or 'random'")
    queries, described, labels = np.asarray(queries), np.asarray(described), np.asarray(labels)
    members = _class_members(labels)
    positives = np.full(queries.shape[0], -1, dtype=np.int64)
    if rule == "nearest":
        if query_desc is None or described_desc is None:
            raise ConfigError("nearest positives need the descriptors of the queries and described images")
        query_desc, _ = _check_described(query_desc, queries, "queries")
        described_desc, _ = _check_described(described_desc, described, "described images")
        order = np.argsort(described, kind="stable")
        described, described_desc = described[order], described_desc[order]
        scores = query_desc.astype(np.float64) @ described_desc.astype(np.float64).T
        for i, q in enumerate(queries):
            mates = np.flatnonzero((labels[described] == labels[q]) & (described != q))
            if mates.size:
                positives[i] = described[mates[np.argmax(scores[i, mates])]]
    for row in np.flatnonzero(positives < 0):
        if rng is None:
            raise ConfigError("random positives need a random generator")
        query = int(queries[row])
        mates = members[int(labels[query])]
        mates = mates[mates != query]
        if mates.size == 0:
            raise TrainingSetError(f"image {query} is the only one of its class: it has no positive")
        positives[row] = mates[rng.integers(mates.size)]
    return positives


# ---- epochs ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class EpochSample:
    """One epoch's dataset indices: the ``queries`` and the ``pool`` negatives are mined from (sorted)."""

    queries: np.ndarray
    pool: np.ndarray


def sample_pool(labels: np.ndarray, pool_size: int, rng: np.random.Generator) -> np.ndarray:
    """``pool_size`` distinct dataset indices, sorted; every class is in the pool when it has room.

    cirtorch draws the pool uniformly; here one random image of each class is drawn first and the rest
    uniformly, which changes nothing at scale and keeps every class available as a negative for small
    training sets. All images when ``pool_size`` reaches the dataset's size.
    """
    labels = np.asarray(labels)
    n = labels.shape[0]
    if pool_size < 1:
        raise ConfigError(f"pool_size must be at least 1, got {pool_size}")
    if pool_size >= n:
        return np.arange(n)
    order = rng.permutation(n)
    _, first = np.unique(labels[order], return_index=True)
    if first.size > pool_size:
        return np.sort(order[:pool_size])
    seeds = order[first]
    rest = np.ones(n, dtype=bool)
    rest[seeds] = False
    fill = order[rest[order]][: pool_size - seeds.size]
    return np.sort(np.concatenate([seeds, fill]))


def sample_epoch(
    labels: np.ndarray, query_count: int, pool_size: int, rng: np.random.Generator
) -> EpochSample:
    """``query_count`` distinct random queries (all images if fewer) and a :func:`sample_pool` of
    ``pool_size``, both as dataset indices; the same ``rng`` state gives the same epoch."""
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.size == 0:
        raise ConfigError(f"labels must be a non-empty (N,) array, got shape {labels.shape}")
    if query_count < 1:
        raise ConfigError(f"query_count must be at least 1, got {query_count}")
    queries = np.sort(rng.choice(labels.size, size=min(query_count, labels.size), replace=False))
    return EpochSample(queries.astype(np.int64), sample_pool(labels, pool_size, rng).astype(np.int64))


def build_tuples(
    sample: EpochSample,
    query_desc: np.ndarray,
    pool_desc: np.ndarray,
    labels: np.ndarray,
    n_negatives: int = DEFAULT_NEGATIVES,
    positives: PositiveRule = "nearest",
    rng: np.random.Generator | None = None,
) -> np.ndarray:
    """The epoch's tuples ``(Q, 2 + n_negatives)`` of dataset indices: query, positive, hard negatives.

    ``query_desc`` and ``pool_desc`` describe ``sample.queries`` and ``sample.pool`` with the current
    network. Positives follow :func:`choose_positives` among the described images (queries and pool);
    negatives are :func:`mine_hard_negatives`. A query whose pool has fewer than ``n_negatives`` other
    classes raises :class:`TrainingSetError`: lower ``n_negatives`` or enlarge the pool.
    """
    labels = np.asarray(labels)
    classes = np.unique(labels).size
    if n_negatives > classes - 1:
        raise ConfigError(
            f"{n_negatives} negatives of distinct classes need at least {n_negatives + 1} classes; "
            f"the training set has {classes}"
        )
    negatives = mine_hard_negatives(
        query_desc, pool_desc, labels[sample.queries], labels[sample.pool], n_negatives
    )
    short = np.flatnonzero((negatives < 0).any(axis=1))
    if short.size:
        raise TrainingSetError(
            f"the pool of {sample.pool.size} images holds fewer than {n_negatives} classes other than "
            f"{short.size} queries' own; enlarge the pool or lower the number of negatives"
        )
    described = np.concatenate([sample.queries, sample.pool])
    described_desc = np.concatenate([np.asarray(query_desc), np.asarray(pool_desc)])
    chosen = choose_positives(sample.queries, query_desc, described, described_desc, labels, positives, rng)
    return np.concatenate([sample.queries[:, None], chosen[:, None], sample.pool[negatives]], axis=1)


def tuple_targets(tuples: np.ndarray, labels: np.ndarray) -> Targets:
    """The loss :class:`~lookalike.train.losses.Targets` of a batch of tuples ``(T, S)`` whose images
    are described in row order (``tuples.ravel()``)."""
    tuples = np.asarray(tuples)
    if tuples.ndim != 2:
        raise ConfigError(f"tuples must be (T, S), got shape {tuples.shape}")
    return Targets(torch.from_numpy(np.asarray(labels)[tuples.ravel()].astype(np.int64)), tuples.shape[1])


__all__ = [
    "DEFAULT_NEGATIVES",
    "EpochSample",
    "PositiveRule",
    "TrainingImages",
    "TrainingSetError",
    "build_tuples",
    "choose_positives",
    "images_from_csv",
    "images_from_folder",
    "mine_hard_negatives",
    "sample_epoch",
    "sample_pool",
    "tuple_targets",
]
