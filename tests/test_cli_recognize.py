"""`lookalike recognize` through the real entry point, on a labelled folder of the bundled sample photos:
one folder per photo holding the photo, its mirror image and its centre crop; the queries are other
versions of the photos, which are not indexed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from lookalike.collection import Collection
from lookalike.errors import ConfigError
from lookalike.recognize import Prediction
from lookalike.recognize.service import Recognizer, folder_label, read_labels, should_whiten
from tests.conftest import LABELLED_CLASSES, json_lines, run_cli, succeeded
from tests.test_cli import TERMINAL

pytestmark = pytest.mark.weights

CLASSES = LABELLED_CLASSES


def test_recognize_names_the_class_and_its_neighbours(labelled: dict[str, Path]) -> None:
    queries = [str(labelled["queries"] / f"{name}.jpg") for name in ("cat", "coffee", "rocket")]
    result = succeeded(run_cli("recognize", *queries, "--collection", str(labelled["collection"]), "--json"))
    records = json_lines(result.stdout)
    assert [r["query"] for r in records] == queries
    for name, record in zip(("cat", "coffee", "rocket"), records, strict=True):
        assert record["label"] == name
        neighbours = record["neighbours"]
        assert len(neighbours) == 7 and record["method"] == "knn"
        assert neighbours[0]["label"] == name and neighbours[0]["path"].startswith(f"{name}/")
        assert [n["rank"] for n in neighbours] == list(range(1, 8))
        assert all(n["path"] != "stray.jpg" for n in neighbours)  # not labelled: never a reference
        similarities = [n["similarity"] for n in neighbours]
        assert similarities == sorted(similarities, reverse=True)
        # k-NN with the identity transform: the confidence sums the winning class's similarities
        assert record["confidence"] == pytest.approx(
            sum(n["similarity"] for n in neighbours if n["label"] == name), abs=1e-4
        )


def test_piped_recognize_prints_json_lines_and_a_terminal_a_table(labelled: dict[str, Path]) -> None:
    query = str(labelled["queries"] / "cat.jpg")
    args = ("recognize", query, "-c", str(labelled["collection"]))
    piped = succeeded(run_cli(*args)).stdout
    assert piped == succeeded(run_cli(*args, "--json")).stdout
    assert json_lines(piped)[0]["label"] == "cat"
    table = succeeded(run_cli(*args, env=TERMINAL)).stdout
    assert "supporting neighbours" in table and "cat/" in table and "{" not in table


@pytest.mark.parametrize(
    ("options", "count"),
    [(("--method", "1nn"), 1), (("--method", "alpha", "-k", "3", "--alpha", "1.2"), 3)],
)
def test_recognize_methods(labelled: dict[str, Path], options: tuple[str, ...], count: int) -> None:
    query = labelled["queries"] / "cat.jpg"
    args = ("recognize", str(query), "-c", str(labelled["collection"]), "--json", *options)
    record = json.loads(succeeded(run_cli(*args)).stdout)
    assert record["label"] == "cat"
    assert len(record["neighbours"]) == count


def test_recognize_labels_from_csv(labelled: dict[str, Path], tmp_path: Path) -> None:
    """A CSV relabels the references; images it does not list (here: the coffee ones) are ignored."""
    rows = ["path,label"] + [
        f"{name}/{kind}.jpg,{'feline' if name == 'cat' else 'other'}"
        for name in CLASSES
        if name != "coffee"
        for kind in ("whole", "flip", "crop")
    ]
    csv_file = tmp_path / "labels.csv"
    csv_file.write_text("\n".join(rows) + "\n")
    queries = [str(labelled["queries"] / "cat.jpg"), str(labelled["queries"] / "coffee.jpg")]
    args = ("-c", str(labelled["collection"]), "--labels", str(csv_file), "--json", "-k", "3")
    cat, coffee = json_lines(succeeded(run_cli("recognize", *queries, *args)).stdout)
    assert cat["label"] == "feline"
    assert all(not n["path"].startswith("coffee/") for n in coffee["neighbours"])


def test_recognize_indexed_queries(labelled: dict[str, Path]) -> None:
    with Collection.open(labelled["collection"], readonly=True) as collection:
        record = collection.record("astronaut/crop.jpg")
        assert record is not None
    args = ("hubble/flip.jpg", f"id:{record.id}", "-c", str(labelled["collection"]), "--json")
    hubble, astronaut = json_lines(succeeded(run_cli("recognize", *args)).stdout)
    assert hubble["label"] == "hubble"
    assert hubble["neighbours"][0]["path"] == "hubble/flip.jpg"  # an indexed image finds itself first
    assert hubble["neighbours"][0]["similarity"] == pytest.approx(1.0, abs=1e-4)
    assert astronaut["label"] == "astronaut"


def test_recognize_errors_are_one_line(labelled: dict[str, Path], tmp_path: Path) -> None:
    query = str(labelled["queries"] / "cat.jpg")
    bad = run_cli("recognize", query, "-c", str(labelled["collection"]), "--method", "vote")
    assert bad.returncode == 1 and "unknown kNN method" in bad.stderr and "Traceback" not in bad.stderr
    empty = tmp_path / "empty.csv"
    empty.write_text("path,label\n")
    none = run_cli("recognize", query, "-c", str(labelled["collection"]), "--labels", str(empty))
    assert none.returncode == 1 and "no indexed image" in none.stderr and "Traceback" not in none.stderr


@pytest.mark.parametrize(
    ("method", "k", "transform"), [("knn", 3, "sqrt"), ("mean", 3, "sqrt"), ("knn", 15, "square")]
)
def test_recognizer_api(labelled: dict[str, Path], method: str, k: int, transform: str) -> None:
    with Collection.open(labelled["collection"], readonly=True) as collection:
        recognizer = Recognizer(collection, method=method, k=k, transform=transform)
        assert recognizer.classes == sorted(CLASSES)
        prediction = recognizer.recognize(Image.open(labelled["queries"] / "rocket.jpg"))
        assert isinstance(prediction, Prediction)
        assert prediction.label == "rocket"
        assert len(prediction.neighbours) == k
        assert recognizer.path(prediction.neighbours[0].id).startswith("rocket/")
        assert {recognizer.path(n.id) for n in prediction.neighbours}.isdisjoint({"stray.jpg"})


def test_labels_helpers(tmp_path: Path) -> None:
    assert folder_label("cats/2019/a.jpg") == "cats"
    assert folder_label("a.jpg") is None
    assert folder_label("/elsewhere/cats/a.jpg") is None
    labels = tmp_path / "labels.csv"
    labels.write_text("path,label\na.jpg, cat\n\nb/c.jpg,dog\n")
    assert read_labels(labels) == {"a.jpg": "cat", "b/c.jpg": "dog"}
    labels.write_text("a.jpg\n")
    with pytest.raises(ValueError, match="expected 'path,label'"):
        read_labels(labels)


def test_whitening_is_automatic_on_or_off() -> None:
    assert not should_whiten("auto", 15, 2048) and should_whiten("auto", 2048, 2048)
    assert should_whiten("on", 15, 2048) and not should_whiten("off", 10**6, 2048)
    with pytest.raises(ConfigError, match="whiten"):
        should_whiten("yes", 15, 2048)


@pytest.mark.parametrize("method", ["knn", "1nn", "mean"])
def test_whitened_recognizer_still_names_each_query(labelled: dict[str, Path], method: str) -> None:
    with Collection.open(labelled["collection"], readonly=True) as collection:
        recognizer = Recognizer(collection, method=method, k=3, whiten="on")
        assert recognizer.whitened and recognizer.classifier.whitening is not None
        for name in ("cat", "coffee", "rocket"):
            prediction = recognizer.recognize(Image.open(labelled["queries"] / f"{name}.jpg"))
            assert prediction.label == name, (method, name, prediction)
