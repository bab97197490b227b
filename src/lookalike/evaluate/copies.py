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
from lookalike.images import load_image
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
    """Query files, the database row of each one's original, and the edit family that made it."""

    paths: tuple[Path, ...]
    sources: np.ndarray
    edits: tuple[str, ...]


def edited_copies(
    database: Sequence[Path],
    counts: dict[str, int],
    seed: int,
    into: Path,
    eligible: np.ndarray | None = None,
) -> EditedCopies:
    """``counts[family]`` edited copies of distinct seeded database photos (drawn among ``eligible``
    rows, default all), written as JPEG (quality 95) under ``into``; files already there are reused."""
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
    return EditedCopies(tuple(paths), chosen.astype(np.int64), tuple(edits))


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
    map: float  # mean of 1 / rank of the original (0 when it is not in the returned depth)
    ms_per_query: float
    per_edit: dict[str, float]  # recall@1 per edit family


def true_ranks(ids: np.ndarray, sources: np.ndarray) -> np.ndarray:
    """1-based rank of each query's source among its returned ids (0: not returned)."""
    hits = ids == sources[:, None]
    return np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, 0)


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
    ranks = true_ranks(ranking.ids, copies.sources)
    edits = np.array(copies.edits)
    per_edit = {family: float(np.mean(ranks[edits == family] == 1)) for family in dict.fromkeys(copies.edits)}
    return CopyResult(
        str(chain),
        float(np.mean(ranks == 1)),
        float(np.mean((ranks >= 1) & (ranks <= 10))),
        float(np.mean(np.where(ranks > 0, 1.0 / np.maximum(ranks, 1), 0.0))),
        1000 * seconds / len(queries),
        per_edit,
    )
