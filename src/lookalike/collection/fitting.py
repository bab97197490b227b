"""Fitting a collection's whitening: PCA on its own descriptors, or learned from a labelled folder."""

from __future__ import annotations

from typing import Protocol

import numpy as np

from lookalike.errors import WhiteningError
from lookalike.extract import Describer
from lookalike.labels import labelled_folder
from lookalike.whitening import (
    MIN_PCA_SAMPLES,
    PcaChoice,
    Whitening,
    fit_chosen_pca_whitening,
    fit_learned_whitening,
)

MAX_PAIRS_PER_CLASS = 200


class Descriptors(Protocol):
    """What fitting reads of a collection: its raw descriptors, and the describer that made them."""

    @property
    def describer(self) -> Describer: ...

    def raw_vectors(self) -> tuple[np.ndarray, np.ndarray]: ...


def fit_collection_pca(
    collection: Descriptors, dim: int | None = None, shrinkage: float | None = None
) -> Whitening:
    """PCA-whitening fitted on the collection's own raw descriptors; :func:`fit_collection_pca_choice`
    without the explanation."""
    return fit_collection_pca_choice(collection, dim, shrinkage)[0]


def fit_collection_pca_choice(
    collection: Descriptors, dim: int | None = None, shrinkage: float | None = None
) -> tuple[Whitening, PcaChoice]:
    """PCA-whitening fitted on the collection's own raw descriptors, and how it was chosen.

    The collection is then searched in that whitening, so it is fitted on the very images it is applied to:
    :func:`~lookalike.whitening.choose_pca` keeps every direction they vary in (``min(D, N − 1)``) and
    shrinks the eigenvalues so that at most one direction per ten images is whitened — plain
    PCA-whitening of N ≤ D images would put every image at −1/(N − 1) from every other. ``dim`` and
    ``shrinkage`` override the choice; a ``dim`` the images cannot support is refused.
    """
    _, raw = collection.raw_vectors()
    if len(raw) < MIN_PCA_SAMPLES:
        raise WhiteningError(
            f"PCA-whitening needs at least {MIN_PCA_SAMPLES} indexed images, the collection has {len(raw)}"
        )
    return fit_chosen_pca_whitening(np.asarray(raw, np.float32), dim=dim, shrinkage=shrinkage)


def same_class_pairs(
    labels: list[str], max_per_class: int = MAX_PAIRS_PER_CLASS, seed: int = 0
) -> np.ndarray:
    """(P, 2) index pairs of images with the same label, at most ``max_per_class`` per class, seeded."""
    rng = np.random.default_rng(seed)
    by_class: dict[str, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    pairs = []
    for members in by_class.values():
        if len(members) < 2:
            continue
        all_pairs = np.array([(a, b) for i, a in enumerate(members) for b in members[i + 1 :]])
        if len(all_pairs) > max_per_class:
            all_pairs = all_pairs[rng.choice(len(all_pairs), max_per_class, replace=False)]
        pairs.append(all_pairs)
    if not pairs:
        raise WhiteningError("learned whitening needs at least one class with two images")
    return np.concatenate(pairs).astype(np.int64)


def fit_learned_from_folder(collection: Descriptors, folder: str, dim: int | None = None) -> Whitening:
    """Learned discriminative whitening from same-class pairs of a labelled folder (class = sub-folder)."""
    dataset = labelled_folder(folder)
    vectors, labels = [], []
    for result in collection.describer.describe_files(dataset.paths):
        if result.vector is not None:
            vectors.append(result.vector)
            labels.append(dataset.labels[result.index])
    if len(vectors) < 2:
        raise WhiteningError(f"{folder}: fewer than two readable images")
    return fit_learned_whitening(np.stack(vectors), same_class_pairs(labels), dim=dim)
