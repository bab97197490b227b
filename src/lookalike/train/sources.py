"""Where the training loop's tuples come from: labelled classes, or every photo its own class.

A :class:`TupleSource` holds the training images, makes an epoch's tuples ``(T, 2 + n)`` of dataset
indices (query, positive, negatives) from the current network's descriptors of the epoch's queries and
pool, and renders the image of each tuple slot: :class:`HardNegativeTuples` shows the images as they are,
:class:`AugmentedTuples` (the unlabelled mode) makes the positive, and optionally the query, a strong
augmentation of the query photo. Negatives are mined the same way for both
(:func:`lookalike.train.tuples.mine_hard_negatives`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from lookalike.errors import ConfigError, ImageError, TrainingSetError
from lookalike.images import image_size
from lookalike.train.augment import AugmentConfig, strong_augment
from lookalike.train.tuples import (
    DEFAULT_NEGATIVES,
    EpochSample,
    PositiveRule,
    TrainingImages,
    build_tuples,
    images_from_csv,
    images_from_folder,
    mine_hard_negatives,
)
from lookalike.walk import walk_images


class TupleSource(Protocol):
    """What the trainer mines from: ``images``, and per epoch the tuples and how each slot is shown."""

    @property
    def images(self) -> TrainingImages: ...

    @property
    def negatives(self) -> int: ...

    def tuples(
        self, sample: EpochSample, query_desc: np.ndarray, pool_desc: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray: ...

    def render(self, image: Image.Image, slot: int, seed: int) -> Image.Image: ...


def _check_negatives(images: TrainingImages, negatives: int, what: str) -> None:
    if negatives < 1:
        raise ConfigError(f"negatives must be at least 1, got {negatives}")
    if len(images.classes) < negatives + 1:
        raise TrainingSetError(
            f"{negatives} negatives of distinct {what} need at least {negatives + 1} {what}; "
            f"the training set has {len(images.classes)}: lower the number of negatives"
        )


class HardNegativeTuples:
    """Labelled classes: positives by ``positives`` (:func:`~lookalike.train.tuples.choose_positives`),
    negatives the hardest of other classes, at most one per class; images shown as they are."""

    def __init__(
        self, images: TrainingImages, negatives: int = DEFAULT_NEGATIVES, positives: PositiveRule = "nearest"
    ) -> None:
        _check_negatives(images, negatives, "classes")
        self.images = images
        self.negatives = negatives
        self.positives: PositiveRule = positives

    def tuples(
        self, sample: EpochSample, query_desc: np.ndarray, pool_desc: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        labels = self.images.labels
        return build_tuples(sample, query_desc, pool_desc, labels, self.negatives, self.positives, rng)

    def render(self, image: Image.Image, slot: int, seed: int) -> Image.Image:
        return image


class AugmentedTuples:
    """Every photo its own class: the positive is a strong augmentation of the query photo (and so is the
    query, with ``augment_query``, each drawn from its own seed); negatives are the nearest other photos."""

    def __init__(
        self,
        images: TrainingImages,
        negatives: int = DEFAULT_NEGATIVES,
        augment: AugmentConfig = AugmentConfig(),
        augment_query: bool = True,
    ) -> None:
        _check_negatives(images, negatives, "photos")
        self.images = images
        self.negatives = negatives
        self.augment = augment
        self.augment_query = augment_query

    def tuples(
        self, sample: EpochSample, query_desc: np.ndarray, pool_desc: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        labels = self.images.labels
        negatives = mine_hard_negatives(
            query_desc, pool_desc, labels[sample.queries], labels[sample.pool], self.negatives
        )
        if (negatives < 0).any():
            raise TrainingSetError(
                f"a pool of {sample.pool.size} photos holds fewer than {self.negatives} others; "
                "enlarge the pool or lower the number of negatives"
            )
        queries = sample.queries[:, None]
        return np.concatenate([queries, queries, sample.pool[negatives]], axis=1)

    def render(self, image: Image.Image, slot: int, seed: int) -> Image.Image:
        if slot == 1 or (slot == 0 and self.augment_query):
            return strong_augment(image, seed, self.augment)
        return image


def images_unlabelled(root: str | Path, check_images: bool = True) -> TrainingImages:
    """Every image below ``root``, each its own class (named by its path relative to ``root``).

    Unreadable files are skipped (with ``check_images``, each header is read); fewer than 2 readable
    images raise :class:`TrainingSetError`.
    """
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    paths, skipped = [], []
    for path in walk_images(root):
        try:
            if check_images:
                image_size(path)
        except ImageError as exc:
            skipped.append((path, exc.reason))
        else:
            paths.append(path)
    if len(paths) < 2:
        raise TrainingSetError(f"{root}: self-supervised training needs at least 2 readable photos")
    names = tuple(str(p.relative_to(root)) for p in paths)
    return TrainingImages(tuple(paths), np.arange(len(paths), dtype=np.int64), names, tuple(skipped))


def training_images(data: str | Path, unlabelled: bool = False) -> TrainingImages:
    """The training set at ``data``: a labelled folder or CSV of ``path,label`` rows, or with
    ``unlabelled`` a folder of photos."""
    path = Path(data)
    if unlabelled:
        return images_unlabelled(path)
    if path.is_file() and path.suffix.lower() == ".csv":
        return images_from_csv(path)
    return images_from_folder(path)


__all__ = [
    "AugmentedTuples",
    "HardNegativeTuples",
    "TupleSource",
    "images_unlabelled",
    "training_images",
]
