"""Strong, seeded photometric and geometric augmentation, Pillow only: positives for unlabelled folders.

In the unlabelled mode a photo's positive is a strong augmentation of itself. :func:`draw_augmentation`
draws every parameter from a numpy generator, in a fixed order, into an :class:`Augmentation`;
:func:`apply_augmentation` applies one, deterministically. So the same seed gives the same image, and a
test or a log can name exactly what was done. The steps, in order:

1. random resized crop keeping 50–100 % of the area, the aspect ratio changed by a factor in 3/4–4/3;
2. rotation by ±20°, cropped to the largest centred rectangle of the same aspect ratio inside the rotated
   picture, so no filled corner shows;
3. mirror, half of the time;
4. rescale: the long side becomes ``scale · L``, ``scale`` in 0.5–1 half of the time and 1 otherwise, ``L``
   the input's long side capped at ``max_side``: outputs never exceed ``L`` and never go below ``L / 2``;
5. colour jitter (brightness, contrast, saturation ×0.6–1.4, hue ±0.05 turn), 80 % of the time;
6. Gaussian blur of radius 0.1–2 px, half of the time;
7. JPEG re-compression at quality 30–90, half of the time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

from lookalike.errors import ConfigError
from lookalike.images import to_rgb


def _check_range(name: str, bounds: tuple[float, float], low: float, high: float) -> None:
    if not low <= bounds[0] <= bounds[1] <= high:
        raise ConfigError(f"{name} must be an ordered range within [{low}, {high}], got {bounds}")


def _check_probability(name: str, p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ConfigError(f"{name} must be a probability in [0, 1], got {p}")


@dataclass(frozen=True)
class AugmentConfig:
    """The ranges and probabilities of :func:`draw_augmentation` (defaults as in the module docstring)."""

    crop_area: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    max_rotation: float = 20.0
    mirror_p: float = 0.5
    rescale_p: float = 0.5
    rescale: tuple[float, float] = (0.5, 1.0)
    colour_p: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.05
    blur_p: float = 0.5
    blur_radius: tuple[float, float] = (0.1, 2.0)
    jpeg_p: float = 0.5
    jpeg_quality: tuple[int, int] = (30, 90)
    max_side: int | None = None

    def __post_init__(self) -> None:
        _check_range("crop_area", self.crop_area, 1e-3, 1.0)
        _check_range("crop_ratio", self.crop_ratio, 1e-3, 1e3)
        _check_range("rescale", self.rescale, 1e-3, 1.0)
        _check_range("blur_radius", self.blur_radius, 0.0, 100.0)
        _check_range("jpeg_quality", self.jpeg_quality, 1, 95)
        if not 0.0 <= self.max_rotation < 45.0:
            raise ConfigError(f"max_rotation must be in [0, 45) degrees, got {self.max_rotation}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{name} jitter must be in [0, 1), got {getattr(self, name)}")
        if not 0.0 <= self.hue <= 0.5:
            raise ConfigError(f"hue jitter must be in [0, 0.5] turns, got {self.hue}")
        for name in ("mirror_p", "rescale_p", "colour_p", "blur_p", "jpeg_p"):
            _check_probability(name, getattr(self, name))
        if self.max_side is not None and self.max_side < 1:
            raise ConfigError(f"max_side must be a positive number of pixels, got {self.max_side}")


@dataclass(frozen=True)
class Augmentation:
    """One drawn augmentation. ``crop`` is ``(left, top, right, bottom)`` in input pixels; ``side`` the
    output's long side; factors of 1, a hue shift, blur radius of 0 and ``jpeg_quality`` None do nothing."""

    crop: tuple[int, int, int, int]
    angle: float
    mirror: bool
    side: int
    brightness: float
    contrast: float
    saturation: float
    hue: float
    blur_radius: float
    jpeg_quality: int | None


def _crop_box(
    width: int, height: int, area: float, ratio: float, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A box of ``area`` of the image whose aspect is the image's times ``ratio``, each side clipped to the
    image; a clipped side keeps ``sqrt(area / ratio)`` or ``sqrt(area · ratio)`` of the area, at least 61 %
    for the defaults."""
    w = min(width, max(1, round(width * math.sqrt(area * ratio))))
    h = min(height, max(1, round(height * math.sqrt(area / ratio))))
    left = int(rng.integers(0, width - w + 1))
    top = int(rng.integers(0, height - h + 1))
    return (left, top, left + w, top + h)


def draw_augmentation(
    size: tuple[int, int], rng: np.random.Generator, config: AugmentConfig = AugmentConfig()
) -> Augmentation:
    """The parameters of one augmentation of an image of ``size`` ``(width, height)``."""
    width, height = size
    if width < 1 or height < 1:
        raise ConfigError(f"cannot augment an empty image of {width}×{height}")
    area = rng.uniform(*config.crop_area)
    ratio = math.exp(rng.uniform(math.log(config.crop_ratio[0]), math.log(config.crop_ratio[1])))
    crop = _crop_box(width, height, area, ratio, rng)
    angle = rng.uniform(-config.max_rotation, config.max_rotation)
    mirror = bool(rng.random() < config.mirror_p)
    rescaled, scale = rng.random() < config.rescale_p, rng.uniform(*config.rescale)
    longest = max(width, height) if config.max_side is None else min(max(width, height), config.max_side)
    side = max(1, math.ceil(longest * (scale if rescaled else 1.0) - 1e-9))
    coloured = rng.random() < config.colour_p
    jitter = [rng.uniform(1 - j, 1 + j) for j in (config.brightness, config.contrast, config.saturation)]
    hue = rng.uniform(-config.hue, config.hue)
    blurred, radius = rng.random() < config.blur_p, rng.uniform(*config.blur_radius)
    compressed, quality = (
        rng.random() < config.jpeg_p,
        int(rng.integers(config.jpeg_quality[0], config.jpeg_quality[1] + 1)),
    )
    return Augmentation(
        crop=crop,
        angle=float(angle),
        mirror=mirror,
        side=side,
        brightness=float(jitter[0]) if coloured else 1.0,
        contrast=float(jitter[1]) if coloured else 1.0,
        saturation=float(jitter[2]) if coloured else 1.0,
        hue=float(hue) if coloured else 0.0,
        blur_radius=float(radius) if blurred else 0.0,
        jpeg_quality=quality if compressed else None,
    )


def inscribed_scale(width: float, height: float, degrees: float) -> float:
    """The largest ``k`` such that a centred, axis-aligned ``k·width × k·height`` rectangle fits inside a
    ``width × height`` rectangle rotated by ``degrees``.

    The corners ``(±a, ±b)`` of the inner box, turned back into the rotated frame, must stay within its
    half-sides: ``a·c + b·s ≤ width / 2`` and ``a·s + b·c ≤ height / 2`` with ``c = |cos θ|``, ``s = |sin θ|``.
    """
    c, s = abs(math.cos(math.radians(degrees))), abs(math.sin(math.radians(degrees)))
    return min(width / (width * c + height * s), height / (width * s + height * c))


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
    if degrees == 0.0:
        return image
    width, height = image.size
    turned = image.rotate(degrees, resample=Image.Resampling.BICUBIC, expand=True)
    k = inscribed_scale(width, height, degrees)
    inner_w, inner_h = max(1, math.floor(k * width) - 2), max(1, math.floor(k * height) - 2)  # 1 px margin
    left, top = (turned.width - inner_w) // 2, (turned.height - inner_h) // 2
    return turned.crop((left, top, left + inner_w, top + inner_h))


def _resize_long_side(image: Image.Image, side: int) -> Image.Image:
    width, height = image.size
    scale = side / max(width, height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return image if size == image.size else image.resize(size, Image.Resampling.LANCZOS)


def _shift_hue(image: Image.Image, turns: float) -> Image.Image:
    shift = round(turns * 256) % 256
    if shift == 0:
        return image
    hsv = np.array(image.convert("HSV"))
    hsv[..., 0] = (hsv[..., 0].astype(np.int64) + shift) % 256
    return Image.fromarray(hsv, "HSV").convert("RGB")


def _recompress(image: Image.Image, quality: int) -> Image.Image:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


def apply_augmentation(image: Image.Image, augmentation: Augmentation) -> Image.Image:
    """``image`` (any mode; made RGB first) with ``augmentation`` applied; a new RGB image."""
    a = augmentation
    out = to_rgb(image).crop(a.crop)
    out = _rotate(out, a.angle)
    if a.mirror:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    out = _resize_long_side(out, a.side)
    if a.brightness != 1.0:
        out = ImageEnhance.Brightness(out).enhance(a.brightness)
    if a.contrast != 1.0:
        out = ImageEnhance.Contrast(out).enhance(a.contrast)
    if a.saturation != 1.0:
        out = ImageEnhance.Color(out).enhance(a.saturation)
    out = _shift_hue(out, a.hue)
    if a.blur_radius > 0.0:
        out = out.filter(ImageFilter.GaussianBlur(a.blur_radius))
    if a.jpeg_quality is not None:
        out = _recompress(out, a.jpeg_quality)
    return out


def strong_augment(
    image: Image.Image, rng: np.random.Generator | int, config: AugmentConfig = AugmentConfig()
) -> Image.Image:
    """One strong augmentation of ``image``; ``rng`` is a generator or a seed (the same seed, the same image)."""
    generator = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    return apply_augmentation(image, draw_augmentation(image.size, generator, config))


__all__ = [
    "AugmentConfig",
    "Augmentation",
    "apply_augmentation",
    "draw_augmentation",
    "inscribed_scale",
    "strong_augment",
]
