"""POST /api/recognize through the ASGI app, on the labelled collection of the sample photos (one folder
per class): uploads and indexed ids, the server's voting options, labels from a CSV, the recognition
block of /api/info, and a collection without labels (409)."""

from __future__ import annotations

import warnings
from pathlib import Path

import httpx
import pytest

from lookalike.collection import Collection
from lookalike.errors import ConfigError, NoReferencesError
from lookalike.extract import DescriptorSettings
from lookalike.recognize import RecognizerOptions
from lookalike.serve import create_app
from tests.conftest import LABELLED_CLASSES, SAMPLE, run_cli

with warnings.catch_warnings():
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def client(labelled: dict[str, Path]) -> TestClient:
    with TestClient(create_app(labelled["collection"])) as test_client:
        yield test_client


def recognize(client: TestClient, path: Path, **fields: str) -> httpx.Response:
    files = {"image": (path.name, path.read_bytes(), "application/octet-stream")}
    return client.post("/api/recognize", files=files, data=fields)


def ok(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    return response.json()


@pytest.mark.parametrize("name", ["cat", "coffee", "rocket"])
def test_an_upload_is_recognised_with_its_neighbours(
    client: TestClient, labelled: dict[str, Path], name: str
) -> None:
    body = ok(recognize(client, labelled["queries"] / f"{name}.jpg"))
    assert body["label"] == name
    assert body["method"] == "knn"
    assert body["query"]["kind"] == "upload" and body["query"]["name"] == f"{name}.jpg"
    neighbours = body["neighbours"]
    assert len(neighbours) == 7
    assert [n["rank"] for n in neighbours] == list(range(1, 8))
    assert neighbours[0]["label"] == name and neighbours[0]["path"].startswith(f"{name}/")
    assert all(n["path"].split("/")[0] == n["label"] for n in neighbours)
    assert "stray.jpg" not in {n["name"] for n in neighbours}
    similarities = [n["score"] for n in neighbours]
    assert similarities == sorted(similarities, reverse=True)
    # identity transform: the confidence is the sum of the winning class's similarities
    voted = sum(n["score"] for n in neighbours if n["label"] == name)
    assert body["confidence"] == pytest.approx(voted, abs=1e-4)
    top = neighbours[0]
    assert top["thumb_url"] == f"/api/thumbs/{top['id']}"
    assert client.get(top["thumb_url"]).status_code == 200


def test_an_indexed_image_by_id_finds_itself(client: TestClient, labelled: dict[str, Path]) -> None:
    with Collection.open(labelled["collection"], readonly=True) as collection:
        record = collection.record("hubble/crop.jpg")
    assert record is not None
    body = ok(client.post("/api/recognize", json={"id": record.id}))
    assert body["label"] == "hubble" and body["query"]["kind"] == "id"
    assert body["neighbours"][0]["id"] == record.id
    assert body["neighbours"][0]["score"] == pytest.approx(1.0, abs=1e-5)
    cropped = ok(client.post("/api/recognize", data={"id": str(record.id), "bbox": "0,0,120,100"}))
    assert cropped["query"]["bbox"] == [0, 0, 120, 100]
    assert cropped["neighbours"][0]["score"] < body["neighbours"][0]["score"]


def test_info_says_how_recognition_votes(client: TestClient) -> None:
    recognition = client.get("/api/info").json()["recognition"]
    assert recognition == {
        "method": "knn",
        "k": 7,
        "transform": "identity",
        "alpha": None,
        "whitened": False,  # auto: 15 references cannot estimate a 2048-d covariance
        "references": 3 * len(LABELLED_CLASSES),
        "classes": sorted(LABELLED_CLASSES),
    }
    schema = client.get("/openapi.json").json()
    assert "/api/recognize" in schema["paths"]
    body = schema["paths"]["/api/recognize"]["post"]["requestBody"]["content"]["multipart/form-data"]
    assert "k" not in body["schema"]["properties"]


def test_bad_requests(client: TestClient, labelled: dict[str, Path], tmp_path: Path) -> None:
    query = labelled["queries"] / "cat.jpg"
    assert recognize(client, query, k="3").status_code == 422
    assert recognize(client, query, rerank="aqe").status_code == 422
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    assert recognize(client, text).status_code == 415
    assert client.post("/api/recognize", json={"id": 10_000}).status_code == 404
    assert client.post("/api/recognize", json={}).status_code == 422


def test_voting_options_and_labels_from_a_csv(labelled: dict[str, Path], tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    rows = [
        f"{name}/{kind}.jpg,{'animal' if name == 'cat' else 'thing'}"
        for name in LABELLED_CLASSES
        for kind in ("whole", "flip")
    ]
    labels.write_text("path,label\n" + "\n".join(rows) + "\n")
    options = RecognizerOptions(method="mean", k=3, transform="square", labels=labels)
    with TestClient(create_app(labelled["collection"], recognition=options)) as client:
        recognition = client.get("/api/info").json()["recognition"]
        assert (recognition["method"], recognition["k"], recognition["transform"]) == ("mean", 3, "square")
        assert recognition["classes"] == ["animal", "thing"] and recognition["references"] == 10
        body = ok(recognize(client, SAMPLE / "cat-crop-flip.jpg"))
        assert body["label"] == "animal" and body["method"] == "mean"
        assert len(body["neighbours"]) == 3
        assert all(not n["path"].endswith("crop.jpg") for n in body["neighbours"])
    with TestClient(create_app(labelled["collection"], recognition=RecognizerOptions("1nn"))) as client:
        body = ok(recognize(client, labelled["queries"] / "coffee.jpg"))
        assert (body["label"], len(body["neighbours"])) == ("coffee", 1)
        assert body["confidence"] == pytest.approx(body["neighbours"][0]["score"], abs=1e-5)


def test_options_that_cannot_work_stop_the_server_from_starting(
    labelled: dict[str, Path], tmp_path: Path
) -> None:
    nothing = tmp_path / "nothing.csv"
    nothing.write_text("elsewhere/a.jpg,cat\n")
    with pytest.raises(NoReferencesError):
        create_app(labelled["collection"], recognition=RecognizerOptions(labels=nothing))
    with pytest.raises(ConfigError, match="unknown kNN method"):
        create_app(labelled["collection"], recognition=RecognizerOptions(method="vote"))
    with pytest.raises(ConfigError, match="alpha"):
        RecognizerOptions(method="knn", alpha=0.5)
    failed = run_cli("serve", "-c", str(labelled["collection"]), "--method", "vote", "--port", "9")
    assert failed.returncode != 0 and "unknown kNN method" in failed.stderr
    assert "Traceback" not in failed.stderr


def test_a_collection_without_labels_serves_search_but_not_recognition(tmp_path: Path) -> None:
    flat = tmp_path / "flat"
    flat.mkdir()
    for name in ("cat.jpg", "rocket.jpg"):
        (flat / name).write_bytes((SAMPLE / name).read_bytes())
    path = tmp_path / "collection"
    with Collection.create(path, DescriptorSettings(imsize=128, precision="fp32"), root=flat) as collection:
        collection.sync()
    with TestClient(create_app(path)) as client:
        assert client.get("/api/info").json()["recognition"] is None
        response = recognize(client, SAMPLE / "cat.jpg")
        assert response.status_code == 409
        assert response.json()["error"] == "no references"
        assert ok(client.post("/api/search", json={"id": 1}))["results"]
