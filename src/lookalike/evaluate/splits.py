"""Test splits of the distractor-heavy recognition protocol and validation folds drawn from the
references only, plus GAP/accuracy scoring of a split; see :mod:`lookalike.evaluate.ladder`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import numpy as np

from lookalike.errors import ConfigError
from lookalike.evaluate.metrics import accuracy, global_average_precision
from lookalike.labels import LabelledImages
from lookalike.recognize.knn import Prediction

TINI: Final = "86.5%"
BALANCED: Final = "50%"
VARIANTS: Final = (TINI, BALANCED)
TINI_OBJECT_QUERIES: Final = 73


@dataclass(frozen=True, eq=False)
class RecognitionSplit:
    """Queries and references as indices into one image set (sorted, disjoint)."""

    name: str
    queries: np.ndarray
    references: np.ndarray

    def __post_init__(self) -> None:
        if np.intersect1d(self.queries, self.references).size:
            raise ConfigError(f"split {self.name}: an image is both a query and a reference")


@dataclass(frozen=True)
class Score:
    """GAP (micro-AP) and accuracy of one split's predictions."""

    gap: float
    accuracy: float


def _round_robin(groups: Sequence[np.ndarray], n: int) -> np.ndarray:
    """Take the first image of each group in turn, then the second, … until ``n`` (or all) are taken."""
    taken: list[int] = []
    depth = max((len(g) for g in groups), default=0)
    for r in range(depth):
        for group in groups:
            if r < len(group):
                taken.append(int(group[r]))
                if len(taken) == n:
                    return np.asarray(taken, dtype=np.int64)
    return np.asarray(taken, dtype=np.int64)


def _shuffled_groups(
    labels: np.ndarray, members: np.ndarray, rng: np.random.Generator
) -> tuple[list[str], list[np.ndarray]]:
    """Classes of ``members`` in a seeded order, each with its members shuffled."""
    classes = sorted(set(labels[members]))
    groups = [rng.permutation(members[labels[members] == c]) for c in classes]
    order = rng.permutation(len(classes))
    return [classes[i] for i in order], [groups[i] for i in order]


def distractor_splits(
    dataset: LabelledImages, object_queries: int = TINI_OBJECT_QUERIES, seed: int = 0
) -> dict[str, RecognitionSplit]:
    """The ``"86.5%"`` and ``"50%"`` test splits of a dataset with a distractor class (see the module doc)."""
    if dataset.distractor is None:
        raise ConfigError("the distractor protocol needs a dataset with a distractor class")
    labels = np.asarray(dataset.labels, dtype=object)
    distractors = np.flatnonzero(labels == dataset.distractor)
    objects = np.flatnonzero(labels != dataset.distractor)
    classes, groups = _shuffled_groups(labels, objects, np.random.default_rng(seed))
    if object_queries > len(classes):
        raise ConfigError(
            f"{object_queries} object queries from different classes, but {len(classes)} classes"
        )
    drawn = _round_robin(groups, max(object_queries, len(distractors)))
    splits = {}
    for name, n in ((TINI, object_queries), (BALANCED, len(distractors))):
        chosen = drawn[:n]
        queries = np.sort(np.concatenate([distractors, chosen]))
        splits[name] = RecognitionSplit(name, queries, np.setdiff1d(objects, chosen))
    return splits


def object_query_count(labels: Sequence[str] | np.ndarray, split: RecognitionSplit) -> int:
    """How many of ``split``'s queries show a class that has references (the rest are distractors)."""
    labels = np.asarray(labels, dtype=object)
    known = set(labels[split.references])
    return sum(label in known for label in labels[split.queries])


def shared_references(splits: dict[str, RecognitionSplit]) -> np.ndarray:
    """The images that are references in every split: the pool the validation folds are drawn from."""
    pools = [s.references for s in splits.values()]
    pool = pools[0]
    for other in pools[1:]:
        pool = np.intersect1d(pool, other)
    return pool


def validation_folds(
    labels: Sequence[str] | np.ndarray,
    pool: np.ndarray,
    object_queries: int,
    distractor_queries: int,
    folds: int = 3,
    heldout: int = 20,
    seed: int = 1,
    name: str = "validation",
) -> list[RecognitionSplit]:
    """Seeded folds inside ``pool``: ``heldout`` classes give ``distractor_queries`` pseudo-distractors,
    the other classes ``object_queries`` object queries (round-robin, so the first ones come from
    different classes) and the references. Fold ``f`` uses ``default_rng([seed, f])``; two calls with the
    same seed but other counts draw the same classes and nested queries."""
    labels = np.asarray(labels, dtype=object)
    pool = np.asarray(pool, dtype=np.int64)
    out = []
    for fold in range(folds):
        rng = np.random.default_rng([seed, fold])
        classes, groups = _shuffled_groups(labels, pool, rng)
        if heldout >= len(classes):
            raise ConfigError(f"cannot hold out {heldout} of {len(classes)} classes")
        pseudo = _round_robin(groups[:heldout], distractor_queries)
        chosen = _round_robin(groups[heldout:], object_queries)
        kept = np.concatenate(groups[heldout:]) if groups[heldout:] else np.empty(0, np.int64)
        queries = np.sort(np.concatenate([pseudo, chosen]))
        out.append(RecognitionSplit(f"{name}-{fold}", queries, np.setdiff1d(kept, chosen)))
    return out


def score(
    predictions: Sequence[Prediction], labels: Sequence[str] | np.ndarray, split: RecognitionSplit
) -> Score:
    """GAP and accuracy of one prediction per query of ``split``; a query whose class has no reference
    (a distractor, real or pseudo) counts as a distractor."""
    labels = np.asarray(labels, dtype=object)
    truth = list(labels[split.queries])
    known = set(labels[split.references])
    predicted = [p.label for p in predictions]
    confidences = np.array([p.confidence for p in predictions], dtype=np.float64)
    confidences[~np.isfinite(confidences)] = -np.inf
    confidences = np.nan_to_num(confidences, neginf=-1e300)
    return Score(
        global_average_precision(predicted, confidences, truth, known), accuracy(predicted, truth, known)
    )


__all__ = [
    "BALANCED",
    "TINI",
    "TINI_OBJECT_QUERIES",
    "VARIANTS",
    "RecognitionSplit",
    "Score",
    "distractor_splits",
    "object_query_count",
    "score",
    "shared_references",
    "validation_folds",
]
