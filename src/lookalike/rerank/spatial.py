"""Spatial verification (``sv``): the shortlist re-scored by how many local-feature matches one geometric
transform explains between the query and each candidate — what tells *the same* object or photo, cropped,
rotated, rescaled or recoloured, from a look-alike of its category.

For each query, the local features (XFeat, or SIFT without weights; :mod:`lookalike.local`) of its image
and of its first ``top`` candidates are matched by mutual nearest neighbours; a homography (or affine map)
is fitted with MAGSAC++ and its inliers counted. A candidate with at least ``min_inliers`` inliers gains

    score' = score + inliers / (inliers + half)

(a bonus in (0, 1) that grows with the evidence and saturates; ``half`` inliers give +0.5), so verified
candidates rise above unverified ones by how sure the geometry is, and among equals the global score still
orders them. Candidates without enough inliers, without readable images or without keypoints keep their
scores; a query with no image (a descriptor query) keeps its ranking.

The defaults are measured (``benchmarks/rerank.py``, ``RESULTS.md`` "Re-ranking"): on strongly edited
copies among 9,143 Caltech-101 photos, matches of cosine ≥ 0.8, a 4 px threshold and ≥ 15 inliers with
``half`` 20 were the best grid point for XFeat and as good as any for SIFT (recall@1 0.76 → 0.95 at top
100); 512 keypoints per image verify as well as 1,024 at a third of the time.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Final

import numpy as np
from PIL import ImageOps

from lookalike.errors import ConfigError
from lookalike.local import (
    AUTO,
    DEFAULT_MAX_KEYPOINTS,
    DEFAULT_MAX_SIZE,
    check_local_features,
    local_describer,
)
from lookalike.local.features import LocalDescriber, LocalFeatures
from lookalike.local.geometry import MODELS, Verification, fit
from lookalike.local.matching import mutual_nearest
from lookalike.rerank.base import Ranking
from lookalike.rerank.registry import register

log = logging.getLogger(__name__)

MAX_TOP: Final = 1000
_WORKERS = 2


def verified_scores(scores: np.ndarray, inliers: np.ndarray, min_inliers: int, half: float) -> np.ndarray:
    """``scores`` plus ``inliers / (inliers + half)`` where ``inliers ≥ min_inliers``, unchanged elsewhere."""
    inliers = inliers.astype(np.float32)
    bonus = np.where(inliers >= min_inliers, inliers / (inliers + half), 0.0)
    return (scores + bonus).astype(np.float32)


def verify_pair(
    query: LocalFeatures,
    candidate: LocalFeatures,
    model: str = "homography",
    threshold: float = 4.0,
    min_similarity: float = 0.8,
    min_matches: int = 8,
) -> Verification:
    """Mutual-nearest matches of two images' local features and the inliers of one ``model`` fitted to
    them; fewer than ``min_matches`` matches are not worth a fit (0 inliers)."""
    matches = mutual_nearest(query.descriptors, candidate.descriptors, min_similarity)
    if len(matches) < min_matches:
        return Verification.none(len(matches))
    points_q = query.keypoints[matches[:, 0]]
    points_c = candidate.keypoints[matches[:, 1]]
    return fit(points_q, points_c, model, threshold)  # type: ignore[arg-type]


@register("sv", "spatial verification: local features of the query and its first `top` candidates matched, "
          "a homography fitted, candidates re-scored by inliers")  # fmt: skip
@dataclass(frozen=True)
class SpatialVerification:
    """``sv`` as a stage (options: see the module docstring). ``features`` is ``xfeat``, ``sift`` or
    ``auto`` (XFeat when its weights are available); ``keypoints`` and ``size`` bound the features per
    image (a collection that stores features with other bounds computes them anew); ``mirror`` also
    matches the mirrored query, for mirrored copies."""

    top: int = 100
    features: str = AUTO
    keypoints: int = DEFAULT_MAX_KEYPOINTS
    size: int = DEFAULT_MAX_SIZE
    model: str = "homography"
    threshold: float = 4.0
    min_inliers: int = 15
    half: float = 20.0
    min_similarity: float = 0.8
    mirror: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.top <= MAX_TOP:
            raise ConfigError(f"sv needs top from 1 to {MAX_TOP} candidates, got {self.top}")
        if self.model not in MODELS:
            raise ConfigError(f"sv: model is one of {', '.join(MODELS)}, got {self.model!r}")
        if not 0.5 <= self.threshold <= 50:
            raise ConfigError(
                f"sv: threshold is a reprojection error of 0.5 to 50 pixels, got {self.threshold}"
            )
        if not 4 <= self.min_inliers <= 10_000:
            raise ConfigError(f"sv: min_inliers is 4 to 10000, got {self.min_inliers}")
        if not 0 < self.half <= 10_000:
            raise ConfigError(f"sv: half must be above 0, got {self.half}")
        if not -1 <= self.min_similarity < 1:
            raise ConfigError(f"sv: min_similarity is a cosine from -1 to 1, got {self.min_similarity}")
        check_local_features(self.features, self.keypoints, self.size, "sv")

    needs_pixels = True

    def depth(self, k: int) -> int:
        return max(k, self.top)

    def describer(self) -> LocalDescriber:
        return local_describer(self.features, self.keypoints, self.size)

    def rerank(self, ranking: Ranking) -> Ranking:
        if ranking.local is None:
            raise ConfigError("sv needs the images of the database: this database has no local features")
        describer = self.describer()
        scores = ranking.scores.copy()
        with ThreadPoolExecutor(_WORKERS) as pool:
            for q in range(len(ranking.queries)):
                queries = self._query_features(ranking, q, describer)
                if queries:
                    scores[q] = self._rescored(ranking, q, queries, describer, pool)
        order = np.argsort(-scores, axis=1, kind="stable")
        return replace(
            ranking,
            scores=np.take_along_axis(scores, order, axis=1),
            ids=np.take_along_axis(ranking.ids, order, axis=1),
        )

    def _query_features(self, ranking: Ranking, q: int, describer: LocalDescriber) -> list[LocalFeatures]:
        image = ranking.pixels[q] if ranking.pixels else None
        if image is not None:
            found = [describer.describe(image)]
            if self.mirror:
                found.append(describer.describe(ImageOps.mirror(image)))
            return found
        own = int(ranking.own[q])
        if own >= 0 and ranking.local is not None:
            stored = ranking.local.local_features([own], describer)[0]
            if stored is not None:
                return [stored]
        log.info("sv: query %d has no image (a descriptor query); its ranking is kept", q)
        return []

    def _rescored(
        self,
        ranking: Ranking,
        q: int,
        queries: list[LocalFeatures],
        describer: LocalDescriber,
        pool: ThreadPoolExecutor,
    ) -> np.ndarray:
        assert ranking.local is not None
        top = min(self.top, ranking.depth)
        ids = ranking.ids[q, :top]
        valid = np.flatnonzero(ids >= 0)
        candidates = ranking.local.local_features([int(i) for i in ids[valid]], describer)

        def inliers(candidate: LocalFeatures | None) -> int:
            if candidate is None or len(candidate) == 0:
                return 0
            return max(self._verify(query, candidate).inliers for query in queries)

        counts = np.zeros(ranking.depth, np.int64)
        counts[valid] = list(pool.map(inliers, candidates))
        return verified_scores(ranking.scores[q], counts, self.min_inliers, self.half)

    def _verify(self, query: LocalFeatures, candidate: LocalFeatures) -> Verification:
        if len(query) == 0:
            return Verification.none()
        # fewer matches than min_inliers cannot give min_inliers inliers: no fit is tried
        return verify_pair(
            query, candidate, self.model, self.threshold, self.min_similarity, max(8, self.min_inliers)
        )
