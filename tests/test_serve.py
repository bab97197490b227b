"""The web server through its ASGI app (no network): search by upload and by id, limits and errors,
originals and cached thumbnails, info and health, concurrent searches, the page and docs served offline;
and `lookalike serve` itself started, asked and stopped."""

from __future__ import annotations

import io
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lookalike.collection import Collection
from lookalike.extract import DescriptorSettings
from lookalike.serve import ServeSettings, create_app
from lookalike.serve.app import STATIC
from lookalike.serve.settings import MEGABYTE
from tests.conftest import SAMPLE, SHARED_DATA, require_weights
from tests.corpus import bomb_png, copy_sample

with warnings.catch_warnings():  # starlette would rather have httpx2; httpx is what is installed
    warnings.filterwarnings("ignore", "Using `httpx` with `starlette.testclient` is deprecated")
    from fastapi.testclient import TestClient

pytestmark = pytest.mark.weights

SETTINGS = DescriptorSettings(imsize=256, precision="fp32")
UKBENCH = SHARED_DATA / "ukbench-sample"
LIMITS = ServeSettings(max_upload_bytes=MEGABYTE, max_pixels=20_000_000)


@pytest.fixture(scope="session")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample photos, the UKBench sample when it is there, and a PNG named .jpg."""
    folder = copy_sample(tmp_path_factory.mktemp("photos"))
    for photo in sorted(UKBENCH.glob("*.jpg")):
        shutil.copy2(photo, folder / photo.name)
    with Image.open(SAMPLE / "rocket.jpg") as rocket:
        rocket.save(folder / "png-named.jpg", "PNG")
    return folder


@pytest.fixture(scope="session")
def collection_dir(photos: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    require_weights("resnet50.keras-imagenet")
    path = tmp_path_factory.mktemp("served") / "collection"
    with Collection.create(path, SETTINGS, root=photos) as collection:
        report = collection.sync()
    assert not report.failed
    return path


@pytest.fixture(scope="module")
def client(collection_dir: Path) -> TestClient:
    with TestClient(create_app(collection_dir, LIMITS)) as test_client:
        yield test_client


@pytest.fixture(scope="module")
def ids(client: TestClient, collection_dir: Path) -> dict[str, int]:
    """Image id of every indexed file name."""
    with Collection.open(collection_dir, readonly=True) as collection:
        return {Path(path).name: record.id for path, record in collection.images().items()}


def upload(client: TestClient, data: bytes, name: str = "query.jpg", **fields: str) -> httpx.Response:
    return client.post("/api/search", files={"image": (name, data, "image/jpeg")}, data=fields)


def assert_error(response: httpx.Response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error", "detail"}
    if error is not None:
        assert body["error"] == error
    return body


# -- searching -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cat.jpg", "hubble.jpg", "ukbench00000.jpg"])
def test_upload_finds_the_same_image_first(client: TestClient, photos: Path, name: str) -> None:
    response = upload(client, (photos / name).read_bytes(), name)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["query"]["kind"] == "upload" and body["query"]["name"] == name
    assert body["k"] == 30
    assert len(body["results"]) == min(30, len(list(photos.iterdir())))
    top = body["results"][0]
    assert (top["name"], top["rank"]) == (name, 1)
    assert top["score"] > 0.99
    assert top["image_url"] == f"/api/images/{top['id']}" and top["thumb_url"] == f"/api/thumbs/{top['id']}"
    scores = [hit["score"] for hit in body["results"]]
    assert scores == sorted(scores, reverse=True)


def test_upload_of_a_ukbench_photo_finds_its_group(client: TestClient, photos: Path) -> None:
    if not (photos / "ukbench00000.jpg").exists():
        pytest.skip(f"the UKBench sample is not at {UKBENCH}")
    body = upload(client, (photos / "ukbench00000.jpg").read_bytes(), k="4").json()
    assert {hit["name"] for hit in body["results"]} == {f"ukbench{i:05d}.jpg" for i in range(4)}


def test_search_by_id_as_form_and_as_json(client: TestClient, ids: dict[str, int]) -> None:
    cat = ids["cat.jpg"]
    by_form = client.post("/api/search", data={"id": str(cat), "k": "5"}).json()
    by_json = client.post("/api/search", json={"id": cat, "k": 5}).json()
    assert by_form == {**by_json, "took_ms": by_form["took_ms"]}
    with Image.open(SAMPLE / "cat.jpg") as image:
        width, height = image.size
    assert by_json["query"] == {
        "kind": "id",
        "id": cat,
        "name": "cat.jpg",
        "width": width,
        "height": height,
        "bbox": None,
    }
    assert len(by_json["results"]) == 5
    assert by_json["results"][0]["id"] == cat
    assert by_json["results"][1]["name"] == "cat-crop-flip.jpg"


def test_search_by_id_with_a_crop_describes_the_file_cropped(client: TestClient, ids: dict[str, int]) -> None:
    body = client.post("/api/search", json={"id": ids["cat.jpg"], "bbox": [0, 0, 200, 200], "k": 3}).json()
    assert body["query"]["bbox"] == [0, 0, 200, 200]
    assert body["results"][0]["score"] < 0.999  # a crop is not the whole image


def test_search_with_query_expansion(client: TestClient, photos: Path, ids: dict[str, int]) -> None:
    photo = (photos / "ukbench00000.jpg").read_bytes()
    plain = upload(client, photo, "ukbench00000.jpg").json()
    expanded = upload(client, photo, "ukbench00000.jpg", rerank="aqe").json()
    assert (plain["rerank"], expanded["rerank"]) == ("none", "aqe")
    assert len(expanded["results"]) == len(plain["results"])
    assert expanded["results"][0]["score"] < plain["results"][0]["score"]
    by_id = client.post("/api/search", json={"id": ids["cat.jpg"], "rerank": "aqe", "k": 3})
    assert by_id.status_code == 200 and by_id.json()["results"][0]["name"] == "cat.jpg"


def test_search_with_a_chain_of_rerankers(
    client: TestClient, photos: Path, collection_dir: Path, ids: dict[str, int]
) -> None:
    """The chain is the CLI's (`--rerank dba,aqe`), answered as the collection answers it, echoed in its
    canonical spelling. An upload has no identity: its indexed copy counts as a neighbour."""
    photo = (photos / "ukbench00000.jpg").read_bytes()
    chained = upload(client, photo, "ukbench00000.jpg", rerank="dba + aqe:n=3", k="4").json()
    assert chained["rerank"] == "dba,aqe:n=3"
    with Collection.open(collection_dir, readonly=True) as collection:
        raw = collection.vectors_of([ids["ukbench00000.jpg"]])
        expected = collection.search_vectors(raw, k=4, rerank="dba,aqe:n=3")[0]
    assert [h["id"] for h in chained["results"]] == [h.id for h in expected]
    described = pytest.approx([h.score for h in expected], abs=1e-3)  # the upload, described afresh
    assert [h["score"] for h in chained["results"]] == described
    as_json = client.post("/api/search", json={"id": expected[0].id, "rerank": "dba,aqe", "k": 2})
    assert as_json.status_code == 200 and as_json.json()["rerank"] == "dba,aqe"


def test_spatial_verification_reranks_an_upload_and_an_indexed_image(
    client: TestClient, photos: Path, ids: dict[str, int]
) -> None:
    """`sv` in the API's chain: the uploaded pixels are matched (a rotated, cropped copy of an indexed photo
    comes back first, verified: its score gains the inlier bonus), and an indexed image searched by id is
    matched with its stored (here: computed, kept in memory) local features."""
    with Image.open(photos / "ukbench00004.jpg") as original:
        edited = original.rotate(12, expand=False).crop((60, 40, 560, 420)).resize((400, 304))
    data = io.BytesIO()
    edited.save(data, "JPEG", quality=80)
    plain = upload(client, data.getvalue(), "copy.jpg", k="5").json()
    verified = upload(client, data.getvalue(), "copy.jpg", k="5", rerank="sv:features=sift,top=10").json()
    assert verified["rerank"] == "sv:top=10,features=sift"
    assert verified["results"][0]["name"] == "ukbench00004.jpg"
    assert verified["results"][0]["score"] > 1.0 > plain["results"][0]["score"]
    by_id = client.post(
        "/api/search", json={"id": ids["ukbench00004.jpg"], "k": 3, "rerank": "sv:features=sift,top=5"}
    )
    assert by_id.status_code == 200
    first, *others = by_id.json()["results"]
    assert (
        first["name"] == "ukbench00004.jpg" and first["score"] > 1.0
    )  # itself, verified by its own features
    group = {f"ukbench0000{i}.jpg" for i in (5, 6, 7)}
    assert any(hit["name"] in group and hit["score"] > 1.0 for hit in others)  # another view of the tin


@pytest.mark.parametrize(
    ("rerank", "detail"),
    [
        ("magic", "unknown re-ranker 'magic'; the registered ones are aqe:n=2,alpha=3.0, dba:n=2,alpha=3.0"),
        ("aqe:n=0", "aqe needs n from 1 to 1000"),
        ("aqe:m=2", "aqe has no option 'm'"),
        ("dba,,aqe", "empty stage"),
        ("none,aqe", "stands alone"),
        ("aqe," * 100, "rerank must be a chain"),
        (["aqe"], "rerank must be a chain"),
        (3, "rerank must be a chain"),
    ],
)
def test_a_bad_chain_is_422(client: TestClient, ids: dict[str, int], rerank: object, detail: str) -> None:
    body = assert_error(client.post("/api/search", json={"id": ids["cat.jpg"], "rerank": rerank}), 422)
    assert body["error"] == "invalid parameter" and detail in body["detail"]
    if isinstance(rerank, str):
        form = client.post("/api/search", data={"id": str(ids["cat.jpg"]), "rerank": rerank})
        assert detail in assert_error(form, 422, "invalid parameter")["detail"]


def test_k_is_between_1_and_100(client: TestClient, ids: dict[str, int], photos: Path) -> None:
    cat = ids["cat.jpg"]
    assert len(client.post("/api/search", json={"id": cat, "k": 1}).json()["results"]) == 1
    everything = client.post("/api/search", json={"id": cat, "k": 100}).json()["results"]
    assert len(everything) == len(ids)
    for bad in (0, 101, -3, 2.5, "ten", True):
        assert_error(client.post("/api/search", json={"id": cat, "k": bad}), 422, "invalid parameter")
    for bad in ("0", "101", "x"):
        assert_error(upload(client, (photos / "cat.jpg").read_bytes(), k=bad), 422, "invalid parameter")


def test_bbox_crops_an_upload(client: TestClient, photos: Path) -> None:
    body = upload(client, (photos / "cat.jpg").read_bytes(), bbox="10,20,300,280", k="3").json()
    assert body["query"]["bbox"] == [10, 20, 300, 280]
    assert body["results"][0]["name"].startswith("cat")


@pytest.mark.parametrize("bbox", ["1,2,3", "5,5,1,1", "a,b,c,d", "0,0,nan,4", "5000,5000,6000,6000"])
def test_bad_bbox_is_422(client: TestClient, photos: Path, bbox: str) -> None:
    body = assert_error(
        upload(client, (photos / "cat.jpg").read_bytes(), bbox=bbox), 422, "invalid parameter"
    )
    assert "bbox" in body["detail"]


def test_exactly_one_query(client: TestClient, photos: Path, ids: dict[str, int]) -> None:
    assert_error(client.post("/api/search", data={"k": "3"}), 422, "invalid parameter")
    assert_error(client.post("/api/search", json={}), 422)
    assert_error(upload(client, (photos / "cat.jpg").read_bytes(), id=str(ids["cat.jpg"])), 422)
    assert_error(client.post("/api/search", json={"id": "seven"}), 422)
    assert_error(client.post("/api/search", json=[1, 2]), 422)
    assert_error(
        client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}), 422
    )
    assert_error(client.post("/api/search", data={"image": "not a file"}), 422)
    assert_error(client.post("/api/search", content=b"id=3", headers={"content-type": "text/plain"}), 415)


def test_unknown_id_is_404(client: TestClient) -> None:
    assert_error(client.post("/api/search", json={"id": 987654}), 404, "unknown image")
    assert_error(client.post("/api/search", json={"id": -1, "bbox": "0,0,5,5"}), 404, "unknown image")


# -- what an upload may be -------------------------------------------------------------------------------


def test_upload_over_the_limit_is_413(client: TestClient) -> None:
    big = os.urandom(LIMITS.max_upload_bytes + 1)
    body = assert_error(upload(client, big), 413, "upload too large")
    assert "1 MB" in body["detail"]


def test_upload_over_the_limit_without_content_length_is_413(client: TestClient) -> None:
    """A chunked body is refused as soon as it passes the limit, not after it has been read whole."""

    def chunks():
        yield b'--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(64):
            yield bytes(64 * 1024)

    response = client.post(
        "/api/search", content=chunks(), headers={"content-type": "multipart/form-data; boundary=x"}
    )
    assert_error(response, 413, "upload too large")


def test_decompression_bomb_is_413(client: TestClient) -> None:
    body = assert_error(upload(client, bomb_png(5000), "small.png"), 413, "image has too many pixels")
    assert "25000000" in body["detail"]


def test_content_is_sniffed_not_the_name(client: TestClient, photos: Path) -> None:
    assert_error(upload(client, b"just some text\n", "text.jpg"), 415, "unsupported image")
    assert_error(upload(client, b"%PDF-1.4\n", "scan.png"), 415, "unsupported image")
    png = io.BytesIO()
    Image.open(photos / "cat.jpg").save(png, "PNG")
    response = upload(client, png.getvalue(), "../folder\\really-a-png.jpg")
    assert response.status_code == 200
    assert response.json()["query"]["name"] == "really-a-png.jpg"  # a label only, never a path
    assert response.json()["results"][0]["name"] == "cat.jpg"


def test_empty_and_truncated_uploads_are_422(client: TestClient, photos: Path) -> None:
    assert_error(upload(client, b"", "empty.jpg"), 422, "invalid parameter")
    truncated = (photos / "cat.jpg").read_bytes()[:2000]
    assert_error(upload(client, truncated, "cut.jpg"), 422, "corrupt image")


def test_busy_model_is_503_with_retry_after(client: TestClient, photos: Path) -> None:
    engine = client.app.state.engine
    engine._waiting = LIMITS.max_waiting
    try:
        response = upload(client, (photos / "cat.jpg").read_bytes())
    finally:
        engine._waiting = 0
    assert_error(response, 503, "busy")
    assert response.headers["retry-after"] == "1"


# -- images and thumbnails -------------------------------------------------------------------------------


def test_original_bytes_and_sniffed_content_type(
    client: TestClient, photos: Path, ids: dict[str, int]
) -> None:
    response = client.get(f"/api/images/{ids['cat.jpg']}")
    assert response.status_code == 200
    assert response.content == (photos / "cat.jpg").read_bytes()
    assert response.headers["content-type"] == "image/jpeg"
    assert response.headers["x-content-type-options"] == "nosniff"
    misnamed = client.get(f"/api/images/{ids['png-named.jpg']}")
    assert misnamed.content == (photos / "png-named.jpg").read_bytes()
    assert misnamed.headers["content-type"] == "image/png"


def test_thumbnail_is_made_once_and_cached_on_disk(
    client: TestClient, collection_dir: Path, ids: dict[str, int]
) -> None:
    engine = client.app.state.engine
    image_id = ids["astronaut.jpg"]
    made = engine.thumbnails.made
    first = client.get(f"/api/thumbs/{image_id}")
    assert first.status_code == 200 and first.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(first.content)) as thumb:
        assert thumb.format == "JPEG" and max(thumb.size) == 256
    cached = list((collection_dir / "thumbs").rglob("*-256.jpg"))
    assert cached and all(p.read_bytes() for p in cached)
    (on_disk,) = [p for p in cached if p.read_bytes() == first.content]
    stamp = (on_disk.stat().st_ino, on_disk.stat().st_mtime_ns)
    second = client.get(f"/api/thumbs/{image_id}")
    assert second.content == first.content
    assert (on_disk.stat().st_ino, on_disk.stat().st_mtime_ns) == stamp
    assert engine.thumbnails.made == made + 1
    assert not list((collection_dir / "thumbs").rglob(".*"))  # no temporary file left behind


def test_unknown_ids_are_404_and_bad_ids_422(client: TestClient) -> None:
    for kind in ("images", "thumbs"):
        assert_error(client.get(f"/api/{kind}/987654"), 404, "unknown image")
        assert_error(client.get(f"/api/{kind}/0"), 404)
        assert_error(client.get(f"/api/{kind}/abc"), 422, "invalid parameter")
        traversal = client.get(f"/api/{kind}/..%2F..%2Fetc%2Fpasswd")
        assert traversal.status_code in (404, 422) and set(traversal.json()) == {"error", "detail"}
    assert_error(client.get("/api/nothing-here"), 404, "not found")


# -- info, health, docs, page ----------------------------------------------------------------------------


def test_health_and_info(client: TestClient, ids: dict[str, int]) -> None:
    assert client.get("/api/health").json() == {"status": "ok", "indexed": len(ids)}
    info = client.get("/api/info").json()
    assert info["indexed"] == len(ids) == info["collection"]["images"]
    assert info["model"] == "resnet50.keras-imagenet"
    assert info["collection"]["settings"]["imsize"] == 256
    assert info["limits"] == {
        "max_upload_bytes": MEGABYTE,
        "max_pixels": 20_000_000,
        "default_k": 30,
        "max_k": 100,
        "thumb_size": 256,
    }


def test_openapi_and_docs_are_served_from_here(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {
        "/api/search",
        "/api/images/{image_id}",
        "/api/thumbs/{image_id}",
        "/api/info",
        "/api/health",
    } <= set(schema["paths"])
    assert set(schema["paths"]["/api/search"]["post"]["requestBody"]["content"]) == {
        "multipart/form-data",
        "application/json",
    }
    assert search_k_schemas(schema) == [{"type": "integer", "minimum": 1, "maximum": 100, "default": 30}] * 2
    for media in ("multipart/form-data", "application/json"):
        rerank = schema["paths"]["/api/search"]["post"]["requestBody"]["content"][media]["schema"]
        rerank = rerank["properties"]["rerank"]
        assert rerank["type"] == "string" and rerank["default"] == "none" and "dba,aqe" in rerank["examples"]
        assert "aqe (n=2, alpha=3.0): α-weighted query expansion" in rerank["description"]
        assert "dba (n=2, alpha=3.0): database-side augmentation" in rerank["description"]
        recognize = schema["paths"]["/api/recognize"]["post"]["requestBody"]["content"][media]["schema"]
        assert {"k", "rerank"}.isdisjoint(recognize["properties"])
    description = schema["components"]["schemas"]["SearchResponse"]["properties"]["rerank"]["description"]
    assert "aqe, dba" in description
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert not re.search(r"(src|href)=\"(https?:)?//", docs.text)
    for asset in re.findall(r"(?:src|href)=\"(/docs/assets/[^\"]+)\"", docs.text):
        assert client.get(asset).status_code == 200


def search_k_schemas(schema: dict) -> list[dict]:
    content = schema["paths"]["/api/search"]["post"]["requestBody"]["content"]
    return [
        content[media]["schema"]["properties"]["k"] for media in ("multipart/form-data", "application/json")
    ]


def test_k_limits_come_from_the_server_settings(collection_dir: Path, ids: dict[str, int]) -> None:
    """The schema and the answers follow ServeSettings(default_k, max_k), not constants."""
    settings = ServeSettings(default_k=3, max_k=5)
    with TestClient(create_app(collection_dir, settings)) as small:
        schema = small.get("/openapi.json").json()
        assert search_k_schemas(schema) == [{"type": "integer", "minimum": 1, "maximum": 5, "default": 3}] * 2
        assert "`k` (default 3, at most 5)" in schema["paths"]["/api/search"]["post"]["description"]
        cat = ids["cat.jpg"]
        assert len(small.post("/api/search", json={"id": cat}).json()["results"]) == 3
        assert len(small.post("/api/search", json={"id": cat, "k": 5}).json()["results"]) == 5
        detail = assert_error(small.post("/api/search", json={"id": cat, "k": 6}), 422)["detail"]
        assert "from 1 to 5" in detail
        assert small.get("/api/info").json()["limits"]["max_k"] == 5


def test_page_and_its_files_load_nothing_from_elsewhere(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("app.js", "app.css", "favicon.svg"):
        assert client.get(f"/static/{name}").status_code == 200
    for path in STATIC.iterdir():
        text = path.read_text()
        assert not re.search(r"https?://(?!www\.w3\.org/2000/svg)", text), f"{path.name} refers elsewhere"


# -- concurrency -----------------------------------------------------------------------------------------


def test_concurrent_searches_all_succeed(client: TestClient, photos: Path, ids: dict[str, int]) -> None:
    names = ["cat.jpg", "coffee.jpg", "hubble.jpg", "rocket.jpg", "astronaut.jpg", "cells.jpg"]
    outcomes: list[tuple[str, int, str | None]] = []
    lock = threading.Lock()

    def worker(number: int) -> None:
        for round_ in range(4):
            name = names[(number + round_) % len(names)]
            if (number + round_) % 2:
                response = upload(client, (photos / name).read_bytes(), name, k="10")
            else:
                response = client.post("/api/search", json={"id": ids[name], "k": 10})
            top = response.json()["results"][0]["name"] if response.status_code == 200 else None
            with lock:
                outcomes.append((name, response.status_code, top))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(outcomes) == 32
    assert all(status == 200 and top == name for name, status, top in outcomes), outcomes


# -- the command -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def lookalike() -> list[str]:
    return [sys.executable, "-m", "lookalike"]


def test_serve_command_answers_then_stops_gracefully(collection_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log = (tmp_path / "serve.log").open("w+")
    process = subprocess.Popen(
        [*lookalike(), "serve", "-c", str(collection_dir), "--port", str(port), "--max-upload-mb", "0.5"],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            try:
                health = httpx.get(f"{base}/api/health", timeout=2)
                break
            except httpx.TransportError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "serve.log"
                ).read_text()
                time.sleep(0.2)
        assert health.json()["status"] == "ok"
        assert httpx.get(f"{base}/api/info").json()["limits"]["max_upload_bytes"] == MEGABYTE // 2
        found = httpx.post(
            f"{base}/api/search", files={"image": ("c.jpg", (SAMPLE / "cat.jpg").read_bytes())}
        )
        assert found.json()["results"][0]["name"] == "cat.jpg"
    finally:
        process.send_signal(signal.SIGINT)
        code = process.wait(timeout=30)
    output = (tmp_path / "serve.log").read_text()
    assert code == 0, output
    assert f"http://127.0.0.1:{port}/" in output
    assert "Application shutdown complete" in output


def test_serve_command_reports_a_missing_collection(tmp_path: Path) -> None:
    result = subprocess.run(
        [*lookalike(), "serve", "-c", str(tmp_path / "nothing"), "--port", str(free_port())],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "error:" in result.stderr and "not a lookalike collection" in result.stderr
    assert "Traceback" not in result.stderr
