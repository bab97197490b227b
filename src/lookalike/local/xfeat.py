"""XFeat (Potje et al., "XFeat: Accelerated Features for Lightweight Image Matching", CVPR 2024): a small
CNN that finds keypoints and describes them with 64-d unit descriptors, fast on a CPU.

The network is written here from the paper's description and the layout of its published weights (the
``xfeat.verlab`` registry entry; Apache-2.0). One pass over the grey image, instance-normalised, gives at
1/8 resolution a 64-channel descriptor map and a reliability map, and from the image's 8×8 cells a 65-way
keypoint logit per cell (64 positions + "none"). Keypoints are the positions of those logits' softmax that
are local maxima in a 5×5 window above ``threshold``, scored by keypoint probability × reliability;
descriptors are sampled at them (bicubic) and L2-normalised.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from lookalike.local.features import LocalFeatures, working_image

DEFAULT_MAX_KEYPOINTS = 512
DEFAULT_MAX_SIZE = 640
DEFAULT_THRESHOLD = 0.05
MODEL_NAME = "xfeat.verlab"
_CELL = 8
_MULTIPLE = 32  # the input sides the network's five stride-2 stages divide evenly


class _Unit(nn.Sequential):
    """Convolution (no bias) → batch norm without affine parameters → ReLU."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout, affine=False)
        self.relu = nn.ReLU(inplace=True)


def _units(*specs: tuple[int, ...]) -> list[nn.Module]:
    return [_Unit(*spec) for spec in specs]


class XFeatNet(nn.Module):
    """Grey image ``(B, 1, H, W)``, sides multiples of 32 → descriptor map ``(B, 64, H/8, W/8)``, keypoint
    logits ``(B, 65, H/8, W/8)`` and reliability ``(B, 1, H/8, W/8)`` in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        self.skip = nn.Conv2d(1, 24, 1)
        self.block1 = nn.Sequential(*_units((1, 4), (4, 8, 3, 2), (8, 8), (8, 24, 3, 2)))
        self.block2 = nn.Sequential(*_units((24, 24), (24, 24)))
        self.block3 = nn.Sequential(*_units((24, 64, 3, 2), (64, 64), (64, 64, 1)))
        self.block4 = nn.Sequential(*_units((64, 64, 3, 2), (64, 64), (64, 64)))
        self.block5 = nn.Sequential(*_units((64, 128, 3, 2), (128, 128), (128, 128), (128, 64, 1)))
        self.block_fusion = nn.Sequential(*_units((64, 64), (64, 64)), nn.Conv2d(64, 64, 1))
        self.heatmap_head = nn.Sequential(*_units((64, 64, 1), (64, 64, 1)), nn.Conv2d(64, 1, 1))
        self.keypoint_head = nn.Sequential(
            *_units((64, 64, 1), (64, 64, 1), (64, 64, 1)), nn.Conv2d(64, 65, 1)
        )

    def forward(self, grey: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = F.instance_norm(grey)
        x2 = self.block2(self.block1(x) + self.skip(F.avg_pool2d(x, 4)))
        x3 = self.block3(x2)
        x4 = self.block4(x3)
        x5 = self.block5(x4)
        size = x3.shape[-2:]
        fused = x3 + F.interpolate(x4, size, mode="bilinear") + F.interpolate(x5, size, mode="bilinear")
        descriptors = self.block_fusion(fused)
        reliability = torch.sigmoid(self.heatmap_head(descriptors))
        logits = self.keypoint_head(F.pixel_unshuffle(x, _CELL))
        return descriptors, logits, reliability


def convert_xfeat(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published state dict in this module's names (the semi-dense refinement MLP is not used)."""
    out = {}
    for key, value in state.items():
        if key.startswith("fine_matcher."):
            continue
        key = key.replace("skip1.1.", "skip.").replace(".layer.0.", ".conv.").replace(".layer.1.", ".norm.")
        out[key] = value
    return out


def keypoint_heatmap(logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel keypoint probability ``(B, 1, H, W)`` from the cell logits ``(B, 65, H/8, W/8)``."""
    return F.pixel_shuffle(F.softmax(logits, dim=1)[:, :64], _CELL)


def local_maxima(heatmap: torch.Tensor, threshold: float, window: int = 5) -> torch.Tensor:
    """``(N, 2)`` integer ``(x, y)`` positions of the one image in ``heatmap`` (1, 1, H, W) that are the
    maximum of their ``window`` × ``window`` neighbourhood and above ``threshold``."""
    peaks = F.max_pool2d(heatmap, window, stride=1, padding=window // 2)
    keep = (heatmap == peaks) & (heatmap > threshold)
    return keep[0, 0].nonzero().flip(-1)


def sample(maps: torch.Tensor, points: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Values ``(N, C)`` of ``maps`` (1, C, h, w) at pixel positions ``points`` (N, 2) of an image of
    ``size`` (W, H), interpolated by ``mode`` (the grid convention the weights were trained with)."""
    scale = torch.tensor([size[0] - 1, size[1] - 1], dtype=maps.dtype)
    grid = (2.0 * points.to(maps.dtype) / scale - 1.0)[None, :, None, :]
    return F.grid_sample(maps, grid, mode=mode, align_corners=False)[0, :, :, 0].T


@dataclass
class XFeatDescriber:
    """XFeat sparse keypoints of an image resized to a long side of ``max_size`` (sides multiples of 32): at most
    ``max_keypoints``, strongest first. ``net`` is the loaded network (:func:`lookalike.local.local_describer`)."""

    net: XFeatNet
    max_keypoints: int = DEFAULT_MAX_KEYPOINTS
    max_size: int = DEFAULT_MAX_SIZE
    threshold: float = DEFAULT_THRESHOLD
    weights_sha256: str = ""
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return "xfeat"

    @property
    def identity(self) -> str:
        return f"xfeat:{self.weights_sha256[:12]}:k{self.max_keypoints}:w{self.max_size}:t{self.threshold:g}"

    @torch.inference_mode()
    def describe(self, image: Image.Image) -> LocalFeatures:
        grey = working_image(image, self.max_size, _MULTIPLE)
        pixels = torch.from_numpy(np.asarray(grey, np.float32) / 255.0)[None, None]
        with self._lock:  # one pass at a time: the network's threads are already all the cores
            descriptors, logits, reliability = self.net(pixels)
        heatmap = keypoint_heatmap(logits)
        points = local_maxima(heatmap, self.threshold)
        if len(points) == 0:
            return LocalFeatures.empty(64, grey.size)
        strength = heatmap[0, 0, points[:, 1], points[:, 0]]
        scores = strength * sample(reliability, points, grey.size, "bilinear")[:, 0]
        order = torch.argsort(-scores)[: self.max_keypoints]
        points, scores = points[order], scores[order]
        vectors = F.normalize(sample(F.normalize(descriptors, dim=1), points, grey.size, "bicubic"), dim=1)
        keep = scores > 0
        return LocalFeatures(
            points[keep].numpy().astype(np.float32),
            vectors[keep].numpy().astype(np.float16),
            scores[keep].numpy().astype(np.float32),
            grey.size,
        )
