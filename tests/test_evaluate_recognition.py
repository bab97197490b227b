"""The recognition protocol as `lookalike evaluate recognition` and as the library's evaluate_recognition,
on a small labelled folder of real Caltech-101 photos (8 classes, a clutter folder and a broken file)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.evaluate.ladder import STAGES
from lookalike.evaluate.recognition import (
    RecognitionProtocol,
    evaluate_recognition,
    multiscale_descriptors,
)
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.labels import labelled_folder
from lookalike.recognize.multiscale import DEFAULT_SCALES
from tests.conftest import SHARED_DATA, json_lines, require_weights, run_cli, succeeded
from tests.test_cli import TERMINAL

pytestmark = pytest.mark.weights

MODEL = "efficientnet-lite0.imagenet"
CLASSES = (
    "accordion",
    "airplanes",
    "Faces_easy",
    "Motorbikes",
    "stop_sign",
    "sunflower",
    "watch",
    "yin_yang",
)
PER_CLASS = 6
CLUTTER = 5
SMALL = RecognitionProtocol(object_queries=3, folds=2, heldout=2, train_queries=4)
CLI_PROTOCOL = ("--object-queries", "3", "--folds", "2", "--heldout", "2", "--train-queries", "4")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 classes × 6 Caltech photos, 5 BACKGROUND_Google photos and one broken JPEG in a class folder."""
    require_weights(MODEL)
    source = SHARED_DATA / "caltech101"
    if not source.is_dir():
        pytest.skip("the shared Caltech-101 data is missing")
    root = tmp_path_factory.mktemp("caltech-small")
    for name, count in [*((c, PER_CLASS) for c in CLASSES), ("BACKGROUND_Google", CLUTTER)]:
        (root / name).mkdir()
        for photo in sorted((source / name).glob("*.jpg"))[:count]:
            shutil.copy2(photo, root / name / photo.name)
    (root / "watch" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


@pytest.fixture(scope="module")
def report(folder: Path):
    seen: list[tuple[str, int, int]] = []
    result = evaluate_recognition(
        folder, MODEL, imsize=128, precision="fp32", protocol=SMALL, progress=lambda *a: seen.append(a)
    )
    return result, seen


def test_the_report_covers_both_splits_and_every_stage(report) -> None:
    result, seen = report
    assert result.images == len(CLASSES) * PER_CLASS + CLUTTER and result.unreadable == 1
    assert result.pooling == "rmac" and result.scales == tuple(DEFAULT_SCALES)
    objects = len(CLASSES) * PER_CLASS
    assert {n: (s.distractors, s.objects) for n, s in result.splits.items()} == {
        "86.5%": (CLUTTER, 3),
        "50%": (CLUTTER, CLUTTER),
    }
    assert all(s.references == objects - s.objects for s in result.splits.values())
    for variant in result.splits:
        rows = result.summary(variant)
        assert [r.stage for r in rows] == list(STAGES)
        assert all(0.0 <= r.test.gap <= 1.0 and 0.0 <= r.validation.gap <= 1.0 for r in rows)
    assert result.extract_seconds_per_image > 0 and result.ladder.verifier_pairs > 0
    assert ("describing", objects + CLUTTER + 1, objects + CLUTTER + 1) in seen
    assert [s for s in seen if s[0] == "ladder"] == [("ladder", i, len(STAGES)) for i in range(1, 11)]
    record = json.loads(json.dumps(result.as_dict()))
    assert record["protocol"] == "recognition" and record["unreadable"] == 1
    assert len(record["splits"]["86.5%"]["stages"]) == len(STAGES)


def test_chunked_descriptors_do_not_depend_on_the_chunk(folder: Path) -> None:
    extractor = Extractor(
        DescriptorSettings(model=MODEL, scales=DEFAULT_SCALES, imsize=128, precision="fp32")
    )
    paths = labelled_folder(folder, distractor="BACKGROUND_Google").paths
    whole, failed, _ = multiscale_descriptors(extractor, paths, "gem")
    chunked, failed_chunked, _ = multiscale_descriptors(extractor, paths, "gem", chunk=7)
    assert whole.shape == (len(paths), len(DEFAULT_SCALES), extractor.dim)
    np.testing.assert_array_equal(failed, failed_chunked)
    assert failed.sum() == 1 and paths[int(np.flatnonzero(failed)[0])].name == "broken.jpg"
    np.testing.assert_allclose(whole, chunked, atol=1e-5)
    norms = np.linalg.norm(whole[~failed], axis=2)
    np.testing.assert_allclose(norms, 1.0, atol=1e-4)


def test_the_protocol_needs_enough_classes(folder: Path) -> None:
    with pytest.raises(ConfigError, match="classes"):
        evaluate_recognition(folder, MODEL, imsize=128, precision="fp32", protocol=RecognitionProtocol())


def untimed(rows: list[dict]) -> list[dict]:
    """Rows without their timings, which differ from run to run."""
    return [{k: v for k, v in row.items() if "seconds" not in k and "_ms_" not in k} for row in rows]


def test_evaluate_recognition_from_the_command_line(folder: Path, report, tmp_path: Path) -> None:
    """--out holds the whole report; --json (and a pipe) one line per stage of each split; a terminal a
    table per split."""
    out = tmp_path / "recognition.json"
    args = ("evaluate", "recognition", "--data", str(folder), "-m", MODEL, "--imsize", "128")
    args += ("--precision", "fp32", *CLI_PROTOCOL, "--no-local")
    result = succeeded(run_cli(*args, "--json", "-o", str(out)))
    record = json.loads(out.read_text())
    rows = json_lines(result.stdout)
    assert [(r["split"], r["stage"]) for r in rows] == [
        (split, stage["stage"]) for split, entry in record["splits"].items() for stage in entry["stages"]
    ]
    stages = [s["stage"] for s in record["splits"]["86.5%"]["stages"]]
    assert stages == [s for s in STAGES if s != "+ verifier"]  # no local features, no SIFT stage
    first = rows[len(stages)]
    assert first["split"] == "50%" and first["model"] == MODEL and first["references"] > 0
    library, _ = report
    assert first["test"]["gap"] == pytest.approx(library.summary("50%")[0].test.gap)
    assert untimed(json_lines(succeeded(run_cli(*args)).stdout)) == untimed(rows)  # piped: the same lines
    table = succeeded(run_cli(*args, env=TERMINAL)).stdout
    assert "similarity matrix" in table and "86.5% distractors" in table and "{" not in table


def test_retrieval_options_are_not_recognition_options(folder: Path) -> None:
    result = run_cli("evaluate", "recognition", "--data", str(folder), "--whiten", "pca", "--quiet")
    assert result.returncode == 2 and "--whiten" in result.stderr
