"""Regenerate the bundled sample photos (src/lookalike/sample) from scikit-image's bundled images.

Real photos, small (long side 384 px): scikit-image's data set is BSD-licensed, its photos public
domain or CC0 (see skimage/data/README). Two derived views per group give the search something to find.
Run: .venv/bin/python tools/make_sample.py
"""

from pathlib import Path

import numpy as np
import skimage.data as data
from PIL import Image, ImageEnhance

OUT = Path(__file__).resolve().parents[1] / "src" / "lookalike" / "sample"
SIDE = 384


def save(array: np.ndarray | Image.Image, name: str) -> None:
    image = array if isinstance(array, Image.Image) else Image.fromarray(array)
    image = image.convert("RGB")
    image.thumbnail((SIDE, SIDE), Image.Resampling.LANCZOS)
    image.save(OUT / f"{name}.jpg", quality=88, optimize=True)


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    left, right, _ = data.stereo_motorcycle()
    photos = {
        "cat": data.chelsea(),
        "coffee": data.coffee(),
        "astronaut": data.astronaut(),
        "rocket": data.rocket(),
        "motorcycle-left": left,
        "motorcycle-right": right,
        "hubble": data.hubble_deep_field(),
        "cells": data.immunohistochemistry(),
    }
    for name, array in photos.items():
        save(array, name)
    cat = Image.fromarray(data.chelsea())
    save(cat.crop((60, 20, 400, 290)).transpose(Image.Transpose.FLIP_LEFT_RIGHT), "cat-crop-flip")
    coffee = Image.fromarray(data.coffee())
    save(ImageEnhance.Brightness(coffee.rotate(8, expand=False)).enhance(0.8), "coffee-rotated-dark")


if __name__ == "__main__":
    main()
