"""Instance-level benchmarks built from any photo folder: seeded edited copies of database photos, each to
be found among all of them, and how a re-ranking chain does at it.

An edit *family* applies one kind of change (a crop, a rotation, a mirror, colour, blur, half size, JPEG);
``strong`` combines what a user's copy typically went through — cropped to 50–80 % of its area, rotated by
up to ±20°, recoloured, halved, re-compressed. Every edit is drawn from a seed
(:mod:`lookalike.train.augment`), so the same seed gives the same queries on every machine.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Final

import numpy as np
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.images import load_image, sha256_of_file
from lookalike.local.cache import FileLocalFeatures
from lookalike.rerank import ArrayDatabase, Chain
from lookalike.rerank.base import LocalFeatureSource
from lookalike.train.augment import AugmentConfig, strong_augment

_NOTHING = AugmentConfig(
    crop_area=(1.0, 1.0), crop_ratio=(1.0, 1.0), max_rotation=0.0, mirror_p=0.0, rescale_p=0.0,
    colour_p=0.0, blur_p=0.0, jpeg_p=0.0,
)  # fmt: skip
EDITS: Final[dict[str, AugmentConfig]] = {
    "crop": replace(_NOTHING, crop_area=(0.5, 0.8), crop_ratio=(3 / 4, 4 / 3)),
    "rotate": replace(_NOTHING, max_rotation=20.0),
    "mirror": replace(_NOTHING, mirror_p=1.0),
    "colour": replace(_NOTHING, colour_p=1.0),
    "blur": replace(_NOTHING, blur_p=1.0, blur_radius=(1.0, 2.0)),
    "half": replace(_NOTHING, rescale_p=1.0, rescale=(0.5, 0.5)),
    "jpeg": replace(_NOTHING, jpeg_p=1.0, jpeg_quality=(20, 40)),
    "strong": AugmentConfig(
        crop_area=(0.5, 0.8),
        max_rotation=20.0,
        mirror_p=0.0,
        rescale_p=1.0,
        rescale=(0.5, 0.5),
        colour_p=1.0,
        blur_p=0.0,
        jpeg_p=1.0,
        jpeg_quality=(30, 60),
    ),
}


@dataclass(frozen=True)
class EditedCopies:
    """Query files, the database row of each one's original, the edit family that made it, and the rows
    that are the same photo as each original (itself, byte-identical files, declared twins)."""

    paths: tuple[Path, ...]
    sources: np.ndarray
    edits: tuple[str, ...]
    same: tuple[np.ndarray, ...] = ()

    def subset(self, chosen: np.ndarray) -> EditedCopies:
        return EditedCopies(
            tuple(self.paths[i] for i in chosen),
            self.sources[chosen],
            tuple(self.edits[i] for i in chosen),
            tuple(self.same[i] for i in chosen) if self.same else (),
        )


def same_photo(database: Sequence[Path], twins: dict[str, str] | None = None) -> list[np.ndarray]:
    """For every database row, the rows holding the same photo: byte-identical files, and the file of the
    same name in a twin folder (``twins``: folder name → folder name, both ways)."""
    by_hash: dict[str, list[int]] = {}
    for row, path in enumerate(database):
        by_hash.setdefault(sha256_of_file(path), []).append(row)
    groups = [set(rows) for rows in by_hash.values() for _ in rows]
    owner = {row: group for group in groups for row in group}
    at = {(p.parent.name, p.name): row for row, p in enumerate(database)}
    both = {**(twins or {}), **{b: a for a, b in (twins or {}).items()}}
    for row, path in enumerate(database):
        twin = at.get((both.get(path.parent.name, ""), path.name))
        if twin is not None:
            merged = owner[row] | owner[twin]
            for member in merged:
                owner[member] = merged
    return [np.array(sorted(owner[row]), np.int64) for row in range(len(database))]


def edited_copies(
    database: Sequence[Path],
    counts: dict[str, int],
    seed: int,
    into: Path,
    eligible: np.ndarray | None = None,
    twins: dict[str, str] | None = None,
) -> EditedCopies:
    """``counts[family]`` edited copies of distinct seeded database photos (drawn among ``eligible``
    rows, default all), written as JPEG (quality 95) under ``into``; files already there are reused.
    Each copy's original, its byte-identical files and its ``twins`` (see :func:`same_photo`) are the
    rows that count as finding it."""
    unknown = set(counts) - set(EDITS)
    if unknown:
        raise ConfigError(f"unknown edit families {sorted(unknown)}; known: {', '.join(EDITS)}")
    rng = np.random.default_rng(seed)
    rows = np.arange(len(database)) if eligible is None else np.asarray(eligible)
    chosen = rng.choice(rows, size=sum(counts.values()), replace=False)
    into.mkdir(parents=True, exist_ok=True)
    paths, edits = [], []
    at = 0
    for family, count in counts.items():
        for i in range(count):
            path = into / f"{family}-{i:04d}-{chosen[at]}.jpg"
            if not path.exists():
                edited = strong_augment(
                    load_image(database[chosen[at]]), seed * 1_000_003 + at, EDITS[family]
                )
                partial = path.with_suffix(".part")
                edited.convert("RGB").save(partial, "JPEG", quality=95)
                partial.replace(path)
            paths.append(path)
            edits.append(family)
            at += 1
    same = same_photo(database, twins)
    return EditedCopies(tuple(paths), chosen.astype(np.int64), tuple(edits), tuple(same[r] for r in chosen))


class LocalArrayDatabase(ArrayDatabase):
    """An in-memory database whose entries' local features come from ``local`` (files, cached)."""

    def __init__(self, xb: np.ndarray, local: LocalFeatureSource) -> None:
        super().__init__(xb)
        self.local = local

    def local_features(self, ids, describer):  # type: ignore[no-untyped-def]
        return self.local.local_features(ids, describer)


def file_database(xb: np.ndarray, paths: Sequence[Path], cache: Path | None) -> LocalArrayDatabase:
    """Database vectors whose row ``i`` is the image ``paths[i]``; local features cached under ``cache``."""
    return LocalArrayDatabase(xb, FileLocalFeatures(lambda i: paths[i], cache))


@dataclass(frozen=True)
class CopyResult:
    chain: str
    recall_at_1: float
    recall_at_10: float
    map: float  # mean AP of the same-photo rows within the returned depth
    ms_per_query: float
    per_edit: dict[str, float]  # recall@1 per edit family


def true_ranks(ids: np.ndarray, same: Sequence[np.ndarray]) -> list[np.ndarray]:
    """1-based ranks, among each query's returned ids, of the rows that are its original photo."""
    return [np.flatnonzero(np.isin(row, positives)) + 1 for row, positives in zip(ids, same, strict=True)]


def copy_ap(ranks: np.ndarray, positives: int) -> float:
    """Average precision of one query whose ``positives`` same-photo rows were returned at ``ranks``."""
    return float(np.sum(np.arange(1, len(ranks) + 1) / ranks) / positives) if positives else 0.0


def run_copies(
    chain: Chain,
    database: LocalArrayDatabase,
    queries: np.ndarray,
    copies: EditedCopies,
    depth: int = 100,
    load: bool = True,
) -> CopyResult:
    """Search each edited copy (vectors ``queries``, pixels read from ``copies.paths`` when ``load``) in
    ``database`` through ``chain``; time per query includes describing its local features."""
    pixels: list[Image.Image | None] = (
        [load_image(p) for p in copies.paths] if load and chain.needs_pixels else []
    )
    started = time.perf_counter()
    ranking = chain.search(database, queries, depth, pixels=pixels)
    seconds = time.perf_counter() - started
    same = copies.same or tuple(np.array([s]) for s in copies.sources)
    ranks = true_ranks(ranking.ids, same)
    first = np.array([r[0] if len(r) else 0 for r in ranks])
    edits = np.array(copies.edits)
    per_edit = {family: float(np.mean(first[edits == family] == 1)) for family in dict.fromkeys(copies.edits)}
    return CopyResult(
        str(chain),
        float(np.mean(first == 1)),
        float(np.mean((first >= 1) & (first <= 10))),
        float(np.mean([copy_ap(r, len(p)) for r, p in zip(ranks, same, strict=True)])),
        1000 * seconds / len(queries),
        per_edit,
    )
