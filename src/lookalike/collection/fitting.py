"""Fitting a collection's whitening: PCA on its own descriptors, or learned from a labelled folder."""

from __future__ import annotations

import numpy as np

from lookalike.collection.collection import Collection
from lookalike.errors import WhiteningError
from lookalike.evaluate.datasets import labelled_folder
from lookalike.whitening import Whitening, fit_learned_whitening, fit_pca_whitening

MAX_PAIRS_PER_CLASS = 200


def fit_collection_pca(collection: Collection, dim: int | None = None) -> Whitening:
    """PCA-whitening fitted on the collection's own raw descriptors (as the seed thesis does).

    Without ``dim``, at most N − 1 components are kept: N descriptors vary in no more directions than that.
    """
    _, raw = collection.raw_vectors()
    if len(raw) < 2:
        raise WhiteningError(f"PCA-whitening needs at least 2 indexed images, the collection has {len(raw)}")
    return fit_pca_whitening(np.asarray(raw, np.float32), dim=dim or min(raw.shape[1], len(raw) - 1))


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


def fit_learned_from_folder(collection: Collection, folder: str, dim: int | None = None) -> Whitening:
    """Learned discriminative whitening from same-class pairs of a labelled folder (class = sub-folder)."""
    dataset = labelled_folder(folder)
    vectors, labels = [], []
    for result in collection.extractor.describe_files(dataset.paths):
        if result.vector is not None:
            vectors.append(result.vector)
            labels.append(dataset.labels[result.index])
    if len(vectors) < 2:
        raise WhiteningError(f"{folder}: fewer than two readable images")
    return fit_learned_whitening(np.stack(vectors), same_class_pairs(labels), dim=dim)
