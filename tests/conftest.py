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
    return Extractor(DescriptorSettings(imsize=256, precision="fp32"))


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
