"""SIFT keypoints (OpenCV) with RootSIFT descriptors: the local features that need no weights.

RootSIFT (Arandjelović & Zisserman, CVPR 2012): each SIFT histogram L1-normalised, square-rooted, so that
the inner product of two unit descriptors is the Hellinger kernel of the histograms — the same cosine
matching as learned descriptors, and better than plain SIFT for retrieval.
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from lookalike.local.features import LocalFeatures, working_image

DEFAULT_MAX_KEYPOINTS = 512
DEFAULT_MAX_SIZE = 640


def root_sift(descriptors: np.ndarray) -> np.ndarray:
    """RootSIFT of SIFT histograms ``(N, 128)``: L1-normalised, square-rooted; rows come out unit L2."""
    descriptors = np.maximum(np.asarray(descriptors, np.float32), 0.0)
    sums = descriptors.sum(axis=1, keepdims=True)
    return np.sqrt(descriptors / np.maximum(sums, 1e-12)).astype(np.float32)


@dataclass(frozen=True)
class SiftDescriber:
    """OpenCV SIFT on the grey working image (long side ``max_size``), the ``max_keypoints`` strongest."""

    max_keypoints: int = DEFAULT_MAX_KEYPOINTS
    max_size: int = DEFAULT_MAX_SIZE

    @property
    def name(self) -> str:
        return "sift"

    @property
    def identity(self) -> str:
        return f"sift-rootsift:opencv{cv2.__version__.split('.')[0]}:k{self.max_keypoints}:w{self.max_size}"

    def describe(self, image: Image.Image) -> LocalFeatures:
        grey = working_image(image, self.max_size)
        pixels = np.asarray(grey, np.uint8)
        sift = cv2.SIFT_create(nfeatures=self.max_keypoints)  # type: ignore[attr-defined]
        points, descriptors = sift.detectAndCompute(pixels, None)
        if descriptors is None or not points:
            return LocalFeatures.empty(128, grey.size)
        keypoints = np.array([p.pt for p in points], np.float32).reshape(-1, 2)
        scores = np.array([p.response for p in points], np.float32)
        features = LocalFeatures(keypoints, root_sift(descriptors).astype(np.float16), scores, grey.size)
        return features.strongest(self.max_keypoints)
