"""Strong augmentation: seeded determinism, size bounds, the rotation crop, and each step doing something."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.train.augment import (
    Augmentation,
    AugmentConfig,
    apply_augmentation,
    draw_augmentation,
    inscribed_scale,
    strong_augment,
)


def photo(width: int = 64, height: int = 48, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    pixels = np.stack([x * 255 // width, y * 255 // height, (x + y) * 127 // (width + height)], axis=-1)
    noise = rng.integers(0, 40, size=(height, width, 3))
    return Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8))


def identity(width: int, height: int) -> Augmentation:
    return Augmentation((0, 0, width, height), 0.0, False, max(width, height), 1.0, 1.0, 1.0, 0.0, 0.0, None)


def test_same_seed_same_image_other_seed_other_image():
    image = photo()
    a, b = strong_augment(image, 7), strong_augment(image, 7)
    assert a.size == b.size and a.tobytes() == b.tobytes()
    g1, g2 = np.random.default_rng(7), np.random.default_rng(7)
    assert strong_augment(image, g1).tobytes() == a.tobytes() == strong_augment(image, g2).tobytes()
    others = {strong_augment(image, seed).tobytes() for seed in range(8, 14)}
    assert len(others) == 6 and a.tobytes() not in others


def test_drawn_parameters_stay_in_their_ranges():
    config = AugmentConfig()
    for seed in range(200):
        a = draw_augmentation((80, 60), np.random.default_rng(seed), config)
        left, top, right, bottom = a.crop
        assert 0 <= left < right <= 80 and 0 <= top < bottom <= 60
        assert 0.5 - 0.03 <= (right - left) * (bottom - top) / (80 * 60) <= 1.0  # rounding of small sides
        assert -20 <= a.angle <= 20 and 40 <= a.side <= 80
        assert all(0.6 <= f <= 1.4 for f in (a.brightness, a.contrast, a.saturation)) and abs(a.hue) <= 0.05
        assert a.blur_radius == 0.0 or 0.1 <= a.blur_radius <= 2.0
        assert a.jpeg_quality is None or 30 <= a.jpeg_quality <= 90


@pytest.mark.parametrize("size", [(64, 48), (32, 64), (40, 40), (7, 5)])
def test_output_long_side_is_bounded_by_the_input_and_max_side(size):
    image = photo(*size)
    for seed in range(12):
        out = strong_augment(image, seed)
        assert out.mode == "RGB"
        assert math.ceil(max(size) / 2) <= max(out.size) <= max(size)
        capped = strong_augment(image, seed, AugmentConfig(max_side=20))
        assert max(capped.size) <= min(20, max(size))


def test_identity_parameters_change_nothing():
    image = photo()
    assert apply_augmentation(image, identity(64, 48)).tobytes() == image.tobytes()


def test_rotation_crop_shows_no_filled_corner():
    white = Image.new("RGB", (60, 40), (255, 255, 255))
    for angle in (-20.0, -7.5, 13.0, 20.0):
        params = Augmentation((0, 0, 60, 40), angle, False, 60, 1.0, 1.0, 1.0, 0.0, 0.0, None)
        out = np.asarray(apply_augmentation(white, params))
        assert out.min() >= 250, angle


def test_inscribed_scale_fits_and_is_tight():
    assert inscribed_scale(60, 40, 0.0) == pytest.approx(1.0)
    for w, h, deg in [(60, 40, 20.0), (40, 60, -15.0), (50, 50, 10.0)]:
        k = inscribed_scale(w, h, deg)
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        corners = [(sx * k * w / 2, sy * k * h / 2) for sx in (-1, 1) for sy in (-1, 1)]
        back = [(x * c + y * s, -x * s + y * c) for x, y in corners]  # into the rotated rectangle's frame
        assert all(abs(u) <= w / 2 + 1e-9 and abs(v) <= h / 2 + 1e-9 for u, v in back)
        assert max(max(abs(u) / (w / 2), abs(v) / (h / 2)) for u, v in back) == pytest.approx(1.0)


def test_each_step_changes_the_image():
    image = photo()
    base = identity(64, 48)
    steps = {
        "crop": {"crop": (8, 4, 56, 40), "side": 48},
        "mirror": {"mirror": True},
        "rescale": {"side": 40},
        "brightness": {"brightness": 1.3},
        "contrast": {"contrast": 0.7},
        "saturation": {"saturation": 0.6},
        "hue": {"hue": 0.05},
        "blur": {"blur_radius": 1.5},
        "jpeg": {"jpeg_quality": 30},
    }
    reference = np.asarray(image).astype(int)
    for name, change in steps.items():
        fields = {**base.__dict__, **change}
        out = np.asarray(apply_augmentation(image, Augmentation(**fields))).astype(int)
        assert out.shape != reference.shape or np.abs(out - reference).mean() > 0.5, name


def test_mirror_is_an_exact_flip():
    image = photo()
    params = Augmentation((0, 0, 64, 48), 0.0, True, 64, 1.0, 1.0, 1.0, 0.0, 0.0, None)
    np.testing.assert_array_equal(np.asarray(apply_augmentation(image, params)), np.asarray(image)[:, ::-1])


def test_non_rgb_input_is_converted():
    grey = photo().convert("L")
    assert strong_augment(grey, 3).mode == "RGB"


def test_bad_configs_are_refused():
    with pytest.raises(ConfigError):
        AugmentConfig(crop_area=(0.9, 0.5))
    with pytest.raises(ConfigError):
        AugmentConfig(jpeg_quality=(30, 120))
    with pytest.raises(ConfigError):
        AugmentConfig(mirror_p=1.5)
    with pytest.raises(ConfigError):
        draw_augmentation((0, 10), np.random.default_rng(0))
