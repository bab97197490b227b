"""Labelled image folders: one sub-folder per class, optionally a clutter (distractor) class, and seeded
train / test splits of them. Both the product (learned whitening from a labelled folder) and the evaluation
protocols read them."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

import numpy as np

from lookalike.errors import ConfigError
from lookalike.walk import walk_images

__all__ = ["LabelledImages", "labelled_folder", "split_labelled"]


@dataclass(frozen=True)
class LabelledImages:
    """Image paths with their class labels (the sub-folder name); ``distractor`` names a clutter class."""

    paths: tuple[Path, ...]
    labels: tuple[str, ...]
    distractor: str | None = None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def classes(self) -> list[str]:
        """Every label, the distractor class included, sorted."""
        return sorted(set(self.labels))

    @property
    def known_classes(self) -> list[str]:
        """The labels that are real classes (all but the distractor class), sorted."""
        return [label for label in self.classes if label != self.distractor]

    @property
    def is_distractor(self) -> tuple[bool, ...]:
        """Per image: does it belong to the distractor class?"""
        return tuple(label == self.distractor for label in self.labels)

    def subset(self, indices: Iterable[int]) -> LabelledImages:
        """The images at ``indices``, in that order."""
        indices = list(indices)
        return replace(
            self, paths=tuple(self.paths[i] for i in indices), labels=tuple(self.labels[i] for i in indices)
        )


def folder_classes(root: Path) -> tuple[list[tuple[Path, str]], list[Path]]:
    """``(image, class)`` for every image below ``root`` in a sub-folder, the class being the top-level
    sub-folder's name, and the images directly in ``root`` (which belong to no class)."""
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    pairs, loose = [], []
    for path in walk_images(root):
        if path.parent == root:
            loose.append(path)
        else:
            pairs.append((path, path.relative_to(root).parts[0]))
    return pairs, loose


def labelled_folder(root: str | Path, distractor: str | None = None) -> LabelledImages:
    """Every image below ``root``, labelled with the name of its top-level sub-folder.

    Images are found by extension (:func:`lookalike.images.is_image_file`), so a file without one — such as
    Caltech-101's ``BACKGROUND_Google/tmp``, a JPEG — is skipped, as it is everywhere else in lookalike.
    Files directly in ``root`` have no class and are skipped too. ``distractor`` names the sub-folder whose
    images are clutter rather than a class (Caltech-101's ``BACKGROUND_Google``): they keep that folder
    name as label and are flagged by :attr:`LabelledImages.is_distractor`.
    """
    root = Path(root)
    pairs, _ = folder_classes(root)
    if not pairs:
        raise ConfigError(f"{root} has no class sub-folders with images")
    dataset = LabelledImages(tuple(p for p, _ in pairs), tuple(label for _, label in pairs), distractor)
    if distractor is not None and distractor not in dataset.labels:
        raise ConfigError(f"{root} has no images in a distractor class {distractor!r}")
    return dataset


def _count(size: float | int, total: int, what: str) -> int:
    """``size`` as a number of items out of ``total``: a float is a fraction (rounded half up), an int a count."""
    if isinstance(size, bool) or not isinstance(size, int | float):
        raise ConfigError(f"train_size must be a float fraction or an int count, got {size!r}")
    if isinstance(size, float):
        if not 0.0 <= size <= 1.0:
            raise ConfigError(f"a train_size fraction must lie in [0, 1], got {size}")
        return math.floor(size * total + 0.5)
    if size < 0:
        raise ConfigError(f"a train_size count must be non-negative, got {size}")
    if what == "classes" and size > total:
        raise ConfigError(f"train_size asks for {size} classes but there are {total}")
    return min(size, total)


def split_labelled(
    dataset: LabelledImages,
    train_size: float | int,
    *,
    by: Literal["image", "class"] = "image",
    seed: int = 0,
) -> tuple[LabelledImages, LabelledImages]:
    """Seeded train / test split of a labelled dataset; both keep the images' original order.

    * ``by="image"`` (stratified): in every class, ``train_size`` of its images go to train — a float is the
      fraction of the class (``floor(f·n + 0.5)`` images), an int the count per class (a class with fewer
      images puts all of them in train) — and the rest to test.
    * ``by="class"`` (held-out classes): ``train_size`` of the classes — a float fraction (rounded half up)
      or an int count — go to train with all their images; the other classes go to test.

    Distractor images are never in train: they all go to test, where they serve as distractor queries.
    Classes are visited in sorted order and shuffled with ``numpy.random.default_rng(seed)``, so the split
    depends only on the dataset's content, ``train_size`` and ``seed``.
    """
    rng = np.random.default_rng(seed)
    members: dict[str, list[int]] = {}
    for index, label in enumerate(dataset.labels):
        if label != dataset.distractor:
            members.setdefault(label, []).append(index)
    classes = sorted(members)
    train: list[int] = []
    if by == "image":
        for label in classes:
            chosen = rng.permutation(members[label])[: _count(train_size, len(members[label]), "images")]
            train.extend(int(i) for i in chosen)
    elif by == "class":
        order = rng.permutation(len(classes))[: _count(train_size, len(classes), "classes")]
        for position in order:
            train.extend(members[classes[position]])
    else:
        raise ConfigError(f"by must be 'image' or 'class', got {by!r}")
    in_train = set(train)
    return (
        dataset.subset(sorted(in_train)),
        dataset.subset(i for i in range(len(dataset)) if i not in in_train),
    )
