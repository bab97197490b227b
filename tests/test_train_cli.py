"""`lookalike train` through the real entry point: a model trained on a few sample photos registers, is
listed, indexes and searches with `-m NAME`; a SIGKILLed run resumes from its saved epoch; bad input and
other settings are clear errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from lookalike.cli.main import app
from lookalike.registry import get_model_config
from lookalike.train.settings import TrainSettings
from lookalike.weights import cache_path
from tests.conftest import SAMPLE, json_lines, require_weights, run_cli
from tests.corpus import variant

MODEL = "efficientnet-lite0.imagenet"
CLASSES = ("cat", "coffee", "rocket")
TINY = ("--imsize", "64", "--negatives", "2", "--queries", "12", "--pool", "12", "--precision", "fp32")


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LOOKALIKE_HOME of its own whose weights cache links to the real one's base model."""
    home = tmp_path_factory.mktemp("train-home")
    (home / "weights").mkdir()
    real = cache_path(get_model_config(MODEL))
    if real.exists():
        (home / "weights" / real.name).symlink_to(real)
    return home


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 4 small versions (as is, mirrored, cropped, both) of a bundled sample photo."""
    root = tmp_path_factory.mktemp("train-photos")
    for name in CLASSES:
        (root / name).mkdir()
        for kind in ("whole", "flip", "crop", "crop-flip"):
            variant(SAMPLE / f"{name}.jpg", kind).resize((64, 48)).save(
                root / name / f"{kind}.jpg", quality=90
            )
    return root


def invoke(home: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args), env={"LOOKALIKE_HOME": str(home), "COLUMNS": "200"})
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def trained(home: Path, photos: Path) -> list[dict]:
    require_weights(MODEL)
    code, output = invoke(
        home, "train", "--data", str(photos), "--backbone", MODEL, "--loss", "contrastive", "--epochs", "1",
        *TINY, "--name", "lite-cats", "--json",
    )  # fmt: skip
    assert code == 0, output
    return json_lines(output)


@pytest.mark.weights
def test_a_trained_model_is_listed_and_indexes_and_searches_with_m(trained, home: Path, photos: Path) -> None:
    start, epoch, done = trained
    assert (start["event"], start["images"], start["classes"], start["resumed_from"]) == ("start", 12, 3, 0)
    assert epoch["event"] == "epoch" and epoch["epoch"] == 1 and epoch["tuples"] == 12
    assert epoch["train_images_per_second"] > 0 and 0 < epoch["negative_distance"] <= 2
    assert done == {"event": "done", "name": "lite-cats", "epochs": 1, "folder": start["folder"]}
    code, listed = invoke(home, "models", "list", "--json")
    entry = next(m for m in json_lines(listed) if m["name"] == "lite-cats")
    assert entry["description"] == f"fine-tuned from {MODEL} with contrastive on {photos}, epoch 1"
    assert entry["pooling"] == "gem" and entry["sources"][0]["locator"].startswith("file://")
    collection = str(home / "collection")
    code, output = invoke(home, "index", str(photos), "-c", collection, "-m", "lite-cats", "--imsize", "64",
                          "--precision", "fp32", "--json")  # fmt: skip
    assert code == 0, output
    assert json.loads(output)["indexed"] == 12
    code, output = invoke(
        home, "search", str(photos / "cat" / "flip.jpg"), "-c", collection, "-k", "4", "--json"
    )
    assert code == 0, output
    assert [hit["path"].split("/")[0] for hit in json_lines(output)] == ["cat"] * 4
    code, output = invoke(home, "info", "-c", collection, "--json")
    assert json.loads(output)["settings"]["model"] == "lite-cats"


@pytest.mark.weights
def test_other_settings_are_refused_and_more_epochs_are_not(trained, home: Path, photos: Path) -> None:
    code, output = invoke(
        home, "train", "--data", str(photos), "--backbone", MODEL, "--loss", "triplet", "--epochs", "1", *TINY,
        "--name", "lite-cats",
    )  # fmt: skip
    assert (
        code == 1 and "other settings (loss: 'contrastive' → 'triplet')" in output and "--restart" in output
    )
    code, output = invoke(
        home, "train", "--data", str(photos), "--backbone", MODEL, "--loss", "contrastive", "--epochs", "1", *TINY,
        "--name", "lite-cats", "--json", "--quiet",
    )  # fmt: skip
    assert code == 0 and output == ""


@pytest.mark.weights
def test_unlabelled_training_with_attention_and_a_whitening_layer(home: Path, photos: Path) -> None:
    require_weights(MODEL)
    code, output = invoke(
        home, "train", "--data", str(photos), "--backbone", MODEL, "--loss", "sos", "--unlabelled", "--soa",
        "--whiten-layer", "--epochs", "1", *TINY, "--queries", "6", "--name", "lite-self", "--json",
    )  # fmt: skip
    assert code == 0, output
    start, epoch, _ = json_lines(output)
    assert start["classes"] == start["images"] == 12 and epoch["tuples"] == 6
    described = json.loads((home / "models" / "lite-self" / "model.json").read_text())
    assert described["attention"] and described["learned_whitening"]
    code, output = invoke(home, "index", str(photos / "cat"), "-c", str(home / "self-collection"), "-m",
                          "lite-self", "--imsize", "64", "--precision", "fp32", "--json")  # fmt: skip
    assert code == 0 and json.loads(output)["indexed"] == 4, output


def test_bad_training_sets_and_names_are_clear_errors(tmp_path: Path, photos: Path) -> None:
    one_class = tmp_path / "one"
    (one_class / "cat").mkdir(parents=True)
    for kind in ("whole", "flip"):
        (one_class / "cat" / f"{kind}.jpg").write_bytes((photos / "cat" / f"{kind}.jpg").read_bytes())
    lonely = tmp_path / "lonely"
    for name in ("cat", "coffee"):
        (lonely / name).mkdir(parents=True)
        (lonely / name / "a.jpg").write_bytes((photos / name / "whole.jpg").read_bytes())
    (lonely / "cat" / "b.jpg").write_bytes((photos / "cat" / "flip.jpg").read_bytes())
    cases = [
        (["--data", str(one_class)], 1, "at least 2 classes, found only cat"),
        (["--data", str(lonely)], 1, "1 have one: coffee"),
        (["--data", str(tmp_path / "absent")], 1, "is not a folder"),
        (["--data", str(photos), "--negatives", "3"], 1, "at least 4 classes"),
        (["--data", str(photos), "--loss", "hinge"], 2, "'hinge' is not one of"),
    ]
    for args, code, message in cases:
        got, output = invoke(tmp_path / "home", "train", *args, "--name", "bad")
        assert (got, message in output) == (code, True), output
        assert "Traceback" not in output
    assert not (tmp_path / "home" / "models" / "bad").exists()
    for name, message in (("../up", "a model name is"), (MODEL, "built-in model")):
        got, output = invoke(tmp_path / "home", "train", "--data", str(photos), "--name", name)
        assert got == 1 and message in output, output


@pytest.mark.weights
@pytest.mark.slow
def test_a_run_killed_mid_epoch_resumes_from_its_saved_epoch(home: Path, photos: Path) -> None:
    require_weights(MODEL)
    args = ("train", "--data", str(photos), "--backbone", MODEL, "--loss", "triplet", "--epochs", "3", *TINY,
            "--name", "lite-killed", "--json")  # fmt: skip
    env = {**os.environ, "LOOKALIKE_HOME": str(home), "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-m", "lookalike", *args], stdout=subprocess.PIPE, text=True, env=env
    )
    assert child.stdout is not None
    for line in child.stdout:
        record = json.loads(line)
        if record["event"] == "epoch":
            assert record["epoch"] == 1
            os.kill(child.pid, signal.SIGKILL)  # epoch 2 has just begun
            break
    assert child.wait(timeout=120) == -signal.SIGKILL
    folder = home / "models" / "lite-killed"
    assert json.loads((folder / "checkpoint.json").read_text())["epoch"] == 1
    resumed = run_cli(*args, env={"LOOKALIKE_HOME": str(home), "OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stderr
    records = json_lines(resumed.stdout)
    assert records[0]["resumed_from"] == 1
    assert [r["epoch"] for r in records if r["event"] == "epoch"] == [2, 3]
    checkpoint = json.loads((folder / "checkpoint.json").read_text())
    assert checkpoint["epoch"] == 3 and [h["epoch"] for h in checkpoint["history"]] == [1, 2, 3]
    assert json.loads((folder / "model.json").read_text())["description"].endswith("epoch 3")
    assert not list(folder.glob("*.next.*"))


def test_command_line_defaults_are_the_training_defaults() -> None:
    import typer

    command = typer.main.get_command(app).commands["train"]  # type: ignore[attr-defined]
    defaults = {param.name: param.default for param in command.params}
    fields = {"queries": "query_count", "pool": "pool_size", "batch": "batch_tuples"}
    settings = TrainSettings(data="x")
    shared = [name for name in defaults if fields.get(name, name) in settings.record() and name != "data"]
    assert len(shared) >= 19
    for name in shared:
        assert defaults[name] == getattr(settings, fields.get(name, name)), name
