"""Local features for pairwise verification: SIFT keypoints (ORB where OpenCV has no SIFT), ratio-test
matching and the RANSAC inlier count of a geometric model between two images.

* :func:`describe_local` detects up to ``max_features`` keypoints on the grey image, resized so that its long
  side is at most ``max_side`` (never upscaled). Points are ``(n, 2)`` float32 pixel coordinates of that
  resized image; SIFT descriptors are ``(n, 128)`` uint8 (OpenCV's SIFT values are integers in 0..255, so
  nothing is lost), ORB descriptors ``(n, 32)`` uint8 bit strings.
* :func:`match_features` keeps the matches that pass Lowe's ratio test (nearest / second nearest
  descriptor distance ``< ratio``), then fits a homography (default) or a fundamental matrix with RANSAC
  and counts the inliers. Fewer tentative matches than the model needs give 0 inliers.
* :class:`LocalFeatureCache` keeps one ``.npz`` per image and settings under
  ``$LOOKALIKE_HOME/local-features``, keyed by the absolute path, size and mtime of the file, so a changed
  file is described again. Files are read with ``allow_pickle=False``.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Final, NamedTuple

import cv2
import numpy as np
from PIL import Image

from lookalike.atomic import save_npz_atomic
from lookalike.errors import ConfigError, ImageError
from lookalike.images import load_image
from lookalike.weights import lookalike_home

_log = logging.getLogger(__name__)

KINDS: Final = ("sift", "orb")
GEOMETRY: Final = ("homography", "fundamental")
_MIN_MATCHES: Final = {"homography": 4, "fundamental": 8}
_FORMAT_VERSION: Final = 1


def sift_available() -> bool:
    """Does this OpenCV build have SIFT (patent-free since OpenCV 4.4)?"""
    return hasattr(cv2, "SIFT_create")


@dataclass(frozen=True)
class LocalFeatureSettings:
    """How local features are detected: ``kind`` ``"sift"`` or ``"orb"``, at most ``max_features``
    keypoints on the image resized to a long side of at most ``max_side`` pixels."""

    kind: str = "sift" if sift_available() else "orb"
    max_features: int = 500
    max_side: int = 640

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"unknown local feature {self.kind!r}; expected one of {', '.join(KINDS)}")
        if self.kind == "sift" and not sift_available():
            raise ConfigError("this OpenCV build has no SIFT; use kind='orb'")
        if self.max_features < 1 or self.max_side < 16:
            raise ConfigError(
                f"max_features must be ≥ 1 and max_side ≥ 16, got {self.max_features}, {self.max_side}"
            )


@dataclass(frozen=True, eq=False)
class LocalFeatures:
    """Keypoints ``points`` ``(n, 2)`` float32 (x, y) and their ``descriptors`` ``(n, d)`` uint8."""

    points: np.ndarray
    descriptors: np.ndarray
    kind: str

    def __len__(self) -> int:
        return int(self.points.shape[0])


class MatchResult(NamedTuple):
    """Tentative matches that passed the ratio test, and how many of them RANSAC kept as inliers."""

    matches: int
    inliers: int


def _grey(image: Image.Image | np.ndarray, max_side: int) -> np.ndarray:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    grey = image.convert("L")
    long_side = max(grey.size)
    if long_side > max_side:
        scale = max_side / long_side
        size = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
        grey = grey.resize(size, Image.Resampling.LANCZOS)
    return np.ascontiguousarray(np.asarray(grey, dtype=np.uint8))


def _detector(settings: LocalFeatureSettings) -> cv2.Feature2D:
    if settings.kind == "sift":
        return cv2.SIFT_create(nfeatures=settings.max_features)  # type: ignore[attr-defined]
    return cv2.ORB_create(nfeatures=settings.max_features)  # type: ignore[attr-defined]


def describe_local(
    image: Image.Image | np.ndarray, settings: LocalFeatureSettings | None = None
) -> LocalFeatures:
    """Keypoints and descriptors of one image (PIL image or ``(H, W[, 3])`` uint8 array)."""
    settings = settings or LocalFeatureSettings()
    grey = _grey(image, settings.max_side)
    keypoints, descriptors = _detector(settings).detectAndCompute(grey, None)
    width = 128 if settings.kind == "sift" else 32
    if descriptors is None or not keypoints:
        return LocalFeatures(np.zeros((0, 2), np.float32), np.zeros((0, width), np.uint8), settings.kind)
    points = np.array([k.pt for k in keypoints], dtype=np.float32).reshape(-1, 2)
    # SIFT values are already integers in 0..255; the clip only guards against surprises.
    codes = np.clip(np.rint(descriptors), 0, 255).astype(np.uint8)
    return LocalFeatures(points, codes, settings.kind)


def _ratio_matches(a: LocalFeatures, b: LocalFeatures, ratio: float) -> list[tuple[int, int]]:
    if len(a) < 2 or len(b) < 2:
        return []
    if a.kind == "sift":
        matcher = cv2.BFMatcher(cv2.NORM_L2)
        da, db = a.descriptors.astype(np.float32), b.descriptors.astype(np.float32)
    else:
        matcher = cv2.BFMatcher(cv2.NORM_HAMMING)
        da, db = a.descriptors, b.descriptors
    pairs = []
    for candidates in matcher.knnMatch(da, db, k=2):
        if len(candidates) == 2 and candidates[0].distance < ratio * candidates[1].distance:
            pairs.append((candidates[0].queryIdx, candidates[0].trainIdx))
    return pairs


def match_features(
    a: LocalFeatures,
    b: LocalFeatures,
    ratio: float = 0.8,
    geometry: str = "homography",
    threshold: float = 8.0,
    seed: int = 0,
) -> MatchResult:
    """Ratio-test matches from ``a`` to ``b`` and their RANSAC inliers (``threshold`` in pixels).

    OpenCV's RANSAC draws its samples from its own generator, seeded here with ``seed`` so that the same
    pair always gives the same count.
    """
    if a.kind != b.kind:
        raise ConfigError(f"cannot match {a.kind} features with {b.kind} features")
    if geometry not in GEOMETRY:
        raise ConfigError(f"unknown geometry {geometry!r}; expected one of {', '.join(GEOMETRY)}")
    if not 0 < ratio <= 1:
        raise ConfigError(f"the ratio test threshold must be in (0, 1], got {ratio}")
    pairs = _ratio_matches(a, b, ratio)
    if len(pairs) < _MIN_MATCHES[geometry]:
        return MatchResult(len(pairs), 0)
    index = np.asarray(pairs, dtype=np.int64)
    src, dst = a.points[index[:, 0]], b.points[index[:, 1]]
    cv2.setRNGSeed(seed)
    if geometry == "homography":
        _, mask = cv2.findHomography(src, dst, cv2.RANSAC, threshold, maxIters=2000, confidence=0.995)
    else:
        _, mask = cv2.findFundamentalMat(src, dst, cv2.FM_RANSAC, threshold, 0.995)
    inliers = 0 if mask is None else int(np.count_nonzero(mask))
    return MatchResult(len(pairs), inliers)


# ---- the per-image cache ---------------------------------------------------------------------------------


class LocalFeatureCache:
    """Local features of image files, computed once and kept as ``.npz`` files (one per image).

    ``folder`` defaults to ``$LOOKALIKE_HOME/local-features/<settings hash>``. An unreadable image is
    logged and gets no features (an empty set), so a pair with it has 0 matches. ``memory`` keeps loaded
    features in a dict as well, for the many pairs a benchmark matches.
    """

    def __init__(
        self,
        settings: LocalFeatureSettings | None = None,
        folder: str | Path | None = None,
        memory: bool = True,
    ) -> None:
        self.settings = settings or LocalFeatureSettings()
        identity = json.dumps({**asdict(self.settings), "version": _FORMAT_VERSION}, sort_keys=True)
        key = hashlib.sha256(identity.encode()).hexdigest()[:16]
        self.folder = Path(folder) if folder is not None else lookalike_home() / "local-features" / key
        self._memory: dict[str, LocalFeatures] | None = {} if memory else None

    def _file(self, path: Path) -> tuple[str, Path]:
        stat = path.stat()
        name = f"{path.absolute()}|{stat.st_size}|{stat.st_mtime_ns}"
        digest = hashlib.sha256(name.encode()).hexdigest()
        return digest, self.folder / digest[:2] / f"{digest}.npz"

    def get(self, path: str | Path) -> LocalFeatures:
        """The features of the image at ``path``, from the cache when present."""
        path = Path(path)
        digest, file = self._file(path)
        if self._memory is not None and digest in self._memory:
            return self._memory[digest]
        features = self._read(file)
        if features is None:
            try:
                features = describe_local(load_image(path), self.settings)
            except ImageError as exc:
                _log.warning("no local features for %s: %s", path, exc)
                features = describe_local(np.zeros((16, 16), np.uint8), self.settings)
            save_npz_atomic(file, points=features.points, descriptors=features.descriptors)
        if self._memory is not None:
            self._memory[digest] = features
        return features

    def _read(self, file: Path) -> LocalFeatures | None:
        if not file.exists():
            return None
        try:
            with np.load(file, allow_pickle=False) as data:
                return LocalFeatures(data["points"], data["descriptors"], self.settings.kind)
        except (OSError, ValueError, KeyError) as exc:
            _log.warning("ignoring a damaged local feature file %s: %s", file, exc)
            return None

    def get_many(self, paths: Sequence[str | Path]) -> list[LocalFeatures]:
        """Features of every path, in order."""
        return [self.get(p) for p in paths]


__all__ = [
    "GEOMETRY",
    "KINDS",
    "LocalFeatureCache",
    "LocalFeatureSettings",
    "LocalFeatures",
    "MatchResult",
    "describe_local",
    "match_features",
    "sift_available",
]
