"""Shared fixtures. Tests never reach the internet; pretrained weights come from the user cache that
`install.sh` fills (tests needing weights that are absent are skipped with the reason)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.registry import get_model_config
from lookalike.weights import cache_path

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = Path(__file__).resolve().parents[1] / "src" / "lookalike" / "sample"


def require_weights(name: str) -> None:
    """Skip when the weights are not cached, unless LOOKALIKE_REQUIRE_WEIGHTS lists them (then fail)."""
    if cache_path(get_model_config(name)).exists():
        return
    message = f"weights of {name} are not cached here (run `lookalike models pull {name}`)"
    if name in os.environ.get("LOOKALIKE_REQUIRE_WEIGHTS", "").split():
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def chelsea() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.chelsea())


@pytest.fixture(scope="session")
def coffee() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.coffee())


@pytest.fixture(scope="session")
def real_photos() -> list[Path]:
    photos = sorted(SAMPLE.glob("*.jpg"))
    shared = sorted((SHARED_DATA / "ukbench-sample").glob("*.jpg"))[:4]
    return photos + shared


@pytest.fixture(scope="session")
def resnet50_extractor():
    from lookalike.extract import DescriptorSettings, Extractor

    require_weights("resnet50.keras-imagenet")
    return Extractor(DescriptorSettings(pooling="gem", imsize=256, precision="fp32"))


def unit_rows(n: int, d: int, seed: int = 0) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real entry point, as a user or a script runs it."""
    command = [sys.executable, "-m", "lookalike", *args]
    return subprocess.run(
        command, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=600
    )


def json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def succeeded(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


LABELLED_CLASSES = ("astronaut", "cat", "coffee", "hubble", "rocket")


@pytest.fixture(scope="session")
def labelled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """photos/<class>/{whole,flip,crop}.jpg indexed into a collection (ResNet-50 at 160 px), a stray
    unlabelled photo in the root, and queries — other versions of three photos — that are not indexed."""
    from PIL import ImageEnhance

    from tests.corpus import variant

    require_weights("resnet50.keras-imagenet")
    base = tmp_path_factory.mktemp("recognize")
    photos = base / "photos"
    for name in LABELLED_CLASSES:
        (photos / name).mkdir(parents=True)
        for kind in ("whole", "flip", "crop"):
            variant(SAMPLE / f"{name}.jpg", kind).save(photos / name / f"{kind}.jpg", quality=92)
    Image.open(SAMPLE / "cells.jpg").save(photos / "stray.jpg")
    queries = base / "queries"
    queries.mkdir()
    (queries / "cat.jpg").write_bytes((SAMPLE / "cat-crop-flip.jpg").read_bytes())
    (queries / "coffee.jpg").write_bytes((SAMPLE / "coffee-rotated-dark.jpg").read_bytes())
    dark = ImageEnhance.Brightness(variant(SAMPLE / "rocket.jpg", "crop-flip")).enhance(0.7)
    dark.save(queries / "rocket.jpg", quality=85)
    collection = base / "collection"
    settings = ("--imsize", "160", "--precision", "fp32")
    succeeded(run_cli("index", str(photos), "--collection", str(collection), "--quiet", *settings))
    return {"photos": photos, "queries": queries, "collection": collection}
