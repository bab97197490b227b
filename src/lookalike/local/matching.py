"""Matching local descriptors: mutual nearest neighbours by cosine, optionally with Lowe's ratio test.

Descriptors are unit rows (float16 or float32); a match is a pair of row indices ``(i, j)``.
"""

from __future__ import annotations

import numpy as np


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarities ``(Na, Nb)`` of unit descriptor rows, in float32."""
    return np.asarray(a, np.float32) @ np.asarray(b, np.float32).T


def mutual_nearest(
    a: np.ndarray, b: np.ndarray, min_similarity: float = -1.0, ratio: float = 1.0
) -> np.ndarray:
    """Matches ``(M, 2)`` int64: pairs that are each other's nearest neighbour, at least ``min_similarity``
    alike, and (when ``ratio < 1``) whose distance is below ``ratio`` × the distance to ``a``'s second
    nearest in ``b`` (Lowe's test, on Euclidean distances of unit rows)."""
    if len(a) == 0 or len(b) == 0:
        return np.zeros((0, 2), np.int64)
    sims = similarity(a, b)
    forward = sims.argmax(axis=1)
    backward = sims.argmax(axis=0)
    rows = np.arange(len(a))
    best = sims[rows, forward]
    keep = (backward[forward] == rows) & (best >= min_similarity)
    if ratio < 1.0 and sims.shape[1] > 1:
        second = np.partition(sims, -2, axis=1)[:, -2]
        distance = np.sqrt(np.maximum(2.0 - 2.0 * best, 0.0))
        second_distance = np.sqrt(np.maximum(2.0 - 2.0 * second, 0.0))
        keep &= distance < ratio * second_distance
    return np.stack([rows[keep], forward[keep]], axis=1).astype(np.int64)
