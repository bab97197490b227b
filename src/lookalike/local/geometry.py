"""Geometric verification: how many matches one plane-to-plane transform explains.

A homography (or an affine map) is fitted to matched keypoints with OpenCV's USAC MAGSAC++ (a RANSAC of
the USAC family); the inliers are the matches it explains within a reprojection threshold. A transform that
squashes, mirrors or blows up the image beyond ``max_scale`` is degenerate and explains nothing, as do fewer
matches than the model needs and inliers that all lie on one line — verification then reports 0 inliers,
never an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

import cv2
import numpy as np

Model = Literal["homography", "affine"]
MODELS: Final = ("homography", "affine")
MIN_MATCHES: Final = {"homography": 4, "affine": 3}


@dataclass(frozen=True)
class Verification:
    inliers: int
    matches: int
    transform: np.ndarray | None  # 3×3, mapping the first image's points onto the second's

    @classmethod
    def none(cls, matches: int = 0) -> Verification:
        return cls(0, matches, None)


def plausible(transform: np.ndarray, max_scale: float = 10.0) -> bool:
    """Finite, orientation-preserving, and scaling area by at most ``max_scale``² either way."""
    if not np.isfinite(transform).all() or abs(transform[2, 2]) < 1e-12:
        return False
    linear = transform[:2, :2] / transform[2, 2]
    det = float(np.linalg.det(linear))
    return 1.0 / max_scale**2 <= det <= max_scale**2


def fit(
    points_a: np.ndarray,
    points_b: np.ndarray,
    model: Model = "homography",
    threshold: float = 6.0,
    iterations: int = 2000,
    seed: int = 0,
) -> Verification:
    """Fit ``model`` to matched points ``(M, 2)`` of a and b with MAGSAC++; count the inliers."""
    matches = len(points_a)
    if matches < MIN_MATCHES[model]:
        return Verification.none(matches)
    a = np.ascontiguousarray(points_a, np.float32).reshape(-1, 1, 2)
    b = np.ascontiguousarray(points_b, np.float32).reshape(-1, 1, 2)
    cv2.setRNGSeed(seed)
    try:
        if model == "homography":
            transform, mask = cv2.findHomography(a, b, cv2.USAC_MAGSAC, threshold, maxIters=iterations)
        else:
            affine, mask = cv2.estimateAffine2D(
                a, b, method=cv2.USAC_MAGSAC, ransacReprojThreshold=threshold, maxIters=iterations
            )
            transform = None if affine is None else np.vstack([affine, [0.0, 0.0, 1.0]])
    except cv2.error:
        return Verification.none(matches)
    if transform is None or mask is None or not plausible(transform):
        return Verification.none(matches)
    inliers = mask.ravel().astype(bool)
    if on_a_line(points_a[inliers], threshold) or on_a_line(points_b[inliers], threshold):
        return Verification.none(matches)
    return Verification(int(inliers.sum()), matches, transform)


def on_a_line(points: np.ndarray, threshold: float) -> bool:
    """Whether ``points`` (M, 2) lie within about ``threshold`` pixels of one line (or are fewer than 3):
    such matches determine no plane-to-plane map, so an edge or a line of text verifies nothing."""
    if len(points) < 3:
        return True
    centred = np.asarray(points, np.float64) - np.mean(points, axis=0)
    spread = np.linalg.svd(centred, compute_uv=False)[-1] / np.sqrt(len(points))
    return bool(spread < threshold)


def reprojection_inliers(transform: np.ndarray, a: np.ndarray, b: np.ndarray, threshold: float) -> np.ndarray:
    """Which matched points ``a`` land within ``threshold`` pixels of ``b`` under ``transform``."""
    homogeneous = np.hstack([a, np.ones((len(a), 1))]) @ transform.T
    projected = homogeneous[:, :2] / np.where(np.abs(homogeneous[:, 2:]) < 1e-12, 1e-12, homogeneous[:, 2:])
    return np.linalg.norm(projected - b, axis=1) <= threshold
