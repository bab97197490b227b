"""Retrieval protocols as data: which images form the database, which are queries, what counts as a match.

Every protocol becomes an :class:`EvalSet`; ``evaluate/run.py`` extracts, whitens and scores any of them.

* ``caltech101`` — class retrieval on a labelled folder with a distractor class. ``split="heldout"``
  (default): a seeded half of the object classes is kept for fitting whitening; every image of the other
  classes is a query against all images of those classes plus the distractors (itself excluded).
  ``split="all"``: every object image is a query against all other images; no whitening data.
* ``ukbench`` — groups of 4 by number; every image is a query (itself excluded from its AP, counted in the
  N-S score).
* ``holidays`` — group = first four digits; the ``xx00`` image of each group is the query.
* ``revisitop`` — revisited Oxford/Paris (``gnd_*.pkl`` or JSON): queries cropped to their box, scored
  Easy/Medium/Hard.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from lookalike.errors import ConfigError
from lookalike.evaluate.datasets import (
    GroundTruth,
    holidays_groups,
    load_gnd_json,
    load_revisitop_gnd,
    ukbench_groups,
)
from lookalike.labels import labelled_folder, split_labelled
from lookalike.walk import walk_images

PROTOCOLS = ("caltech101", "ukbench", "holidays", "revisitop")
CALTECH_DISTRACTOR = "BACKGROUND_Google"
# Caltech-101's Faces_easy holds the photos of Faces cropped tighter, under the same file names: for
# copy detection a photo and its twin are the same photo.
CALTECH_TWINS = {"Faces": "Faces_easy"}


@dataclass(frozen=True)
class EvalSet:
    """Database images, queries (database indices, or separate cropped images) and ground truth.

    ``gnd[q]`` holds database-index arrays ``ok`` and ``junk`` (or ``easy``/``hard``/``junk`` when
    ``revisited``). ``train`` / ``train_labels`` are images disjoint from the queries for fitting whitening.
    """

    name: str
    images: tuple[Path, ...]
    gnd: list[dict[str, np.ndarray]]
    query_ids: np.ndarray | None = None
    query_images: tuple[Path, ...] = ()
    query_bboxes: tuple[tuple[float, float, float, float] | None, ...] = ()
    train: tuple[Path, ...] = ()
    train_labels: tuple[str, ...] = ()
    revisited: bool = False
    groups: np.ndarray | None = None

    @property
    def query_count(self) -> int:
        return len(self.gnd)


def caltech101(root: str | Path, split: Literal["heldout", "all"] = "heldout", seed: int = 0) -> EvalSet:
    dataset = labelled_folder(root, distractor=CALTECH_DISTRACTOR)
    if split == "heldout":
        train, test = split_labelled(dataset, 0.5, by="class", seed=seed)
    elif split == "all":
        train, test = None, dataset
    else:
        raise ConfigError(f"caltech101 split must be heldout or all, got {split!r}")
    labels = np.array(test.labels)
    distractor = np.array(test.is_distractor)
    queries = np.flatnonzero(~distractor)
    gnd = []
    for q in queries:
        same = np.flatnonzero((labels == labels[q]) & ~distractor)
        gnd.append({"ok": same[same != q], "junk": np.array([q])})
    return EvalSet(
        name=f"caltech101-{split}",
        images=test.paths,
        gnd=gnd,
        query_ids=queries,
        train=train.paths if train else (),
        train_labels=train.labels if train else (),
    )


def ukbench(root: str | Path) -> EvalSet:
    images = tuple(walk_images(root))
    groups = ukbench_groups(images)
    gnd = []
    for q in range(len(images)):
        same = np.flatnonzero(groups == groups[q])
        gnd.append({"ok": same[same != q], "junk": np.array([q])})
    return EvalSet("ukbench", images, gnd, query_ids=np.arange(len(images)), groups=groups)


def holidays(root: str | Path) -> EvalSet:
    images = tuple(walk_images(root))
    truth = holidays_groups(images)
    query_ids = np.array([truth.images.index(name) for name in truth.queries])
    return EvalSet("holidays", images, list(truth.gnd), query_ids=query_ids)


def revisitop(root: str | Path, gnd_path: str | Path, extension: str = ".jpg") -> EvalSet:
    """Images at ``root/jpg/<name>.jpg`` (revisitop's layout) or ``root/<name>.jpg``."""
    path = Path(gnd_path)
    truth: GroundTruth = load_gnd_json(path) if path.suffix == ".json" else load_revisitop_gnd(path)
    folder = Path(root) / "jpg" if (Path(root) / "jpg").is_dir() else Path(root)
    images = tuple(folder / f"{name}{extension}" for name in truth.images)
    queries = tuple(folder / f"{name}{extension}" for name in truth.queries)
    boxes = tuple(tuple(float(v) for v in entry["bbx"]) if "bbx" in entry else None for entry in truth.gnd)
    return EvalSet(
        name=path.stem.removeprefix("gnd_"),
        images=images,
        gnd=list(truth.gnd),
        query_images=queries,
        query_bboxes=boxes,  # type: ignore[arg-type]
        revisited=all("easy" in entry for entry in truth.gnd),
    )


def build(protocol: str, data: str | Path, gnd: str | Path | None = None, split: str = "heldout") -> EvalSet:
    if protocol == "caltech101":
        return caltech101(data, split)  # type: ignore[arg-type]
    if protocol == "ukbench":
        return ukbench(data)
    if protocol == "holidays":
        return holidays(data)
    if protocol == "revisitop":
        if gnd is None:
            raise ConfigError("the revisitop protocol needs --gnd gnd_roxford5k.pkl (or its JSON form)")
        return revisitop(data, gnd)
    raise ConfigError(f"unknown protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
