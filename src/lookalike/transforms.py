"""Pixels to network input: our own small replacements for torchvision transforms."""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from lookalike.registry import Preprocess


def to_tensor(image: Image.Image, preprocess: Preprocess) -> torch.Tensor:
    """An RGB PIL image → normalised float32 tensor ``(3, H, W)`` as the weights expect."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    if preprocess.colour == "BGR":
        pixels = pixels[:, :, ::-1]
    mean = np.asarray(preprocess.mean, dtype=np.float32)
    std = np.asarray(preprocess.std, dtype=np.float32)
    normalised = (pixels * np.float32(preprocess.scale) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))


def resize_short_side(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    scale = side / min(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image.resize(size, Image.Resampling.BILINEAR, reducing_gap=None)


def centre_crop(image: Image.Image, size: int) -> Image.Image:
    width, height = image.size
    left, top = (width - size) // 2, (height - size) // 2
    return image.crop((left, top, left + size, top + size))


def classification_input(image: Image.Image, preprocess: Preprocess, size: int = 224) -> torch.Tensor:
    """The standard ImageNet evaluation view: short side to size·8/7, centre crop ``size``."""
    return to_tensor(centre_crop(resize_short_side(image, round(size * 8 / 7)), size), preprocess)
