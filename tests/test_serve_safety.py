"""The web server against hostile requests and hostile files, on a real uvicorn on loopback (a request that
would hang fails on its client timeout instead of hanging the suite):

1. ids outside 64 bits, JSON nested past the recursion limit and an unexpected exception are JSON 4xx/500,
   never a traceback;
2. a symlink, a changed file or a FIFO swapped in for an indexed file is refused at once (404/409), and
   blocks nothing;
3. a foreign Host header is refused (DNS rebinding), the access token is asked for and carried by a cookie,
   and `lookalike serve` refuses to listen beyond loopback without one;
4. a body trickled past the body timeout gets 408 while other requests are answered; HEAD works.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from lookalike.collection import Collection
from lookalike.extract import DescriptorSettings
from lookalike.serve import ServeSettings, create_app
from tests.conftest import SAMPLE, require_weights
from tests.test_browser import serving

pytestmark = pytest.mark.weights

PHOTOS = ("astronaut.jpg", "cat.jpg", "coffee.jpg", "hubble.jpg", "rocket.jpg")
TOKEN = "a-token-for-the-tests-0123456789"
TIMEOUT = 1.0  # the guarded server's body timeout, seconds


@dataclass
class Server:
    app: FastAPI
    url: str
    client: httpx.Client


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Five sample photos indexed at 128 px; the tests swap files in ``photos`` and put them back."""
    require_weights("resnet50.keras-imagenet")
    base = tmp_path_factory.mktemp("safety")
    photos = base / "photos"
    photos.mkdir()
    for name in PHOTOS:
        shutil.copy2(SAMPLE / name, photos / name)
    collection = base / "collection"
    with Collection.create(collection, DescriptorSettings(imsize=128, precision="fp32"), root=photos) as c:
        assert not c.sync().failed
    secret = base / "secret.txt"
    secret.write_text("root:x:0:0:root:/root:/bin/bash\n")
    return {"photos": photos, "collection": collection, "secret": secret}


@pytest.fixture(scope="module")
def ids(indexed: dict[str, Path]) -> dict[str, int]:
    with Collection.open(indexed["collection"], readonly=True) as collection:
        return {Path(path).name: record.id for path, record in collection.images().items()}


@pytest.fixture(scope="module")
def plain(indexed: dict[str, Path]) -> Iterator[Server]:
    """The server as `create_app` makes it by default: no token, default limits."""
    app = create_app(indexed["collection"])
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield Server(app, url, client)


@pytest.fixture(scope="module")
def guarded(indexed: dict[str, Path]) -> Iterator[Server]:
    """A server with an access token, one more host name and a one-second body timeout."""
    settings = ServeSettings(token=TOKEN, allowed_hosts=("Photos.Example",), body_timeout=TIMEOUT)
    app = create_app(indexed["collection"], settings)
    with serving(app) as url, httpx.Client(base_url=url, timeout=10) as client:
        yield Server(app, url, client)


@pytest.fixture
def photos(indexed: dict[str, Path]) -> Iterator[Path]:
    """The photos folder, every file put back as indexed (content and mtime) after the test."""
    folder = indexed["photos"]
    stamps = {name: (folder / name).stat() for name in PHOTOS}
    yield folder
    for name, stamp in stamps.items():
        path = folder / name
        if path.is_symlink() or not path.is_file() or path.read_bytes() != (SAMPLE / name).read_bytes():
            path.unlink(missing_ok=True)
            shutil.copyfile(SAMPLE / name, path)
        os.utime(path, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))


def assert_error(response: httpx.Response, status: int, error: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert set(body) == {"error", "detail"}
    assert "Traceback" not in response.text
    if error is not None:
        assert body["error"] == error, body
    return body


def upload(client: httpx.Client, name: str = "cat.jpg", **headers: str) -> httpx.Response:
    files = {"image": (name, (SAMPLE / name).read_bytes(), "image/jpeg")}
    return client.post("/api/search", files=files, data={"k": "3"}, headers=headers)


# -- 1. ids, JSON and unexpected errors ------------------------------------------------------------------


OUT_OF_RANGE = [2**63, 2**64, -(2**63) - 1, int("9" * 30)]


@pytest.mark.parametrize("kind", ["images", "thumbs"])
def test_path_ids_outside_64_bits_are_422_and_in_range_unknown_ones_404(plain: Server, kind: str) -> None:
    for bad in OUT_OF_RANGE:
        body = assert_error(plain.client.get(f"/api/{kind}/{bad}"), 422, "invalid parameter")
        assert body["detail"][0]["at"] == ["path", "image_id"]
    assert_error(plain.client.get(f"/api/{kind}/{'9' * 5000}"), 422)
    for unknown in (2**63 - 1, 0, -1, -(2**63)):
        assert_error(plain.client.get(f"/api/{kind}/{unknown}"), 404, "unknown image")


@pytest.mark.parametrize("endpoint", ["/api/search", "/api/recognize"])
def test_body_ids_outside_64_bits_are_422(plain: Server, endpoint: str) -> None:
    client = plain.client
    for bad in OUT_OF_RANGE:
        for body in ({"id": bad}, {"id": str(bad)}, {"id": bad, "bbox": "0,0,5,5"}):
            assert (
                "64-bit" in assert_error(client.post(endpoint, json=body), 422, "invalid parameter")["detail"]
            )
        assert_error(client.post(endpoint, data={"id": str(bad)}), 422, "invalid parameter")
    assert_error(client.post(endpoint, json={"id": "9" * 5000}), 422, "invalid parameter")
    assert_error(client.post("/api/search", json={"id": 2**63 - 1}), 404, "unknown image")


@pytest.mark.parametrize("body", [b"[" * 100_000, b'{"id": ' + b"[" * 100_000, b'{"a":' * 50_000])
def test_json_nested_past_the_recursion_limit_is_422(plain: Server, body: bytes) -> None:
    response = plain.client.post("/api/search", content=body, headers={"content-type": "application/json"})
    assert "nested too deeply" in assert_error(response, 422, "invalid parameter")["detail"]
    assert plain.client.get("/api/health").status_code == 200


def test_an_unexpected_exception_is_a_json_500_logged_here_not_sent(
    plain: Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    async def broken() -> dict:
        raise RuntimeError("internal detail /home/someone/.secret")

    monkeypatch.setattr(plain.app.state.engine, "info", broken)
    with caplog.at_level(logging.ERROR, logger="lookalike.serve"):
        response = plain.client.get("/api/info")
    assert_error(response, 500, "internal error")
    assert "secret" not in response.text and "RuntimeError" not in response.text
    (logged,) = [r for r in caplog.records if r.name.startswith("lookalike.serve")]
    assert "GET /api/info" in logged.getMessage()
    assert logged.exc_info and "internal detail" in str(logged.exc_info[1])
    monkeypatch.undo()
    assert plain.client.get("/api/info").status_code == 200


# -- 2. files swapped in for indexed ones ----------------------------------------------------------------


def test_a_symlink_out_of_the_root_is_never_followed(
    plain: Server, photos: Path, ids: dict[str, int], indexed: dict[str, Path]
) -> None:
    rocket = ids["rocket.jpg"]
    client = plain.client
    assert client.get(f"/api/thumbs/{rocket}").status_code == 200  # cached now: still refused below
    (photos / "rocket.jpg").unlink()
    (photos / "rocket.jpg").symlink_to(indexed["secret"])
    for url in (f"/api/images/{rocket}", f"/api/thumbs/{rocket}"):
        response = client.get(url)
        assert "outside the collection's folder" in assert_error(response, 404, "file refused")["detail"]
        assert "root:x" not in response.text
        assert client.head(url).status_code == 404
    assert_error(client.post("/api/search", json={"id": rocket, "bbox": "0,0,50,50"}), 404, "file refused")
    assert client.post("/api/search", json={"id": rocket, "k": 1}).status_code == 200  # stored descriptor


def test_a_symlink_to_another_photo_in_the_root_is_a_changed_file(
    plain: Server, photos: Path, ids: dict[str, int]
) -> None:
    (photos / "rocket.jpg").unlink()
    (photos / "rocket.jpg").symlink_to(photos / "cat.jpg")
    for kind in ("images", "thumbs"):
        assert_error(plain.client.get(f"/api/{kind}/{ids['rocket.jpg']}"), 409, "file changed")


def test_a_rewritten_file_is_409_and_a_touched_one_is_checked_by_its_sha256(
    plain: Server, photos: Path, ids: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    hubble, original = photos / "hubble.jpg", (SAMPLE / "hubble.jpg").read_bytes()
    url = f"/api/images/{ids['hubble.jpg']}"
    changed = bytearray(original)
    changed[-10] ^= 0xFF  # same size, other content, new mtime
    hubble.write_bytes(bytes(changed))
    assert "re-index" in assert_error(plain.client.get(url), 409, "file changed")["detail"]
    from lookalike.serve.files import OpenedFile

    hubble.write_bytes(original)  # the same content with a new mtime: served, its sha256 matches
    response = plain.client.get(url)
    assert response.status_code == 200 and response.content == original
    assert response.headers["content-type"] == "image/jpeg"
    hashed: list[str] = []
    monkeypatch.setattr(OpenedFile, "sha256", lambda opened: hashed.append(opened.name) or "")
    assert plain.client.get(url).status_code == 200 and not hashed  # checked once, not every time


def test_a_fifo_swapped_in_is_refused_at_once_and_blocks_no_thread(
    plain: Server, photos: Path, ids: dict[str, int]
) -> None:
    fifo = photos / "coffee.jpg"
    fifo.unlink()
    os.mkfifo(fifo)
    coffee = ids["coffee.jpg"]
    try:
        started = time.monotonic()
        urls = [f"/api/thumbs/{coffee}"] * 2 + [f"/api/images/{coffee}"] * 2  # more than decode_threads
        with ThreadPoolExecutor(len(urls)) as pool:
            responses = list(pool.map(lambda url: httpx.get(plain.url + url, timeout=5), urls))
        assert time.monotonic() - started < 3
        for response in responses:
            assert "not a regular file" in assert_error(response, 404, "file refused")["detail"]
        found = upload(plain.client, "cat.jpg")
        assert found.status_code == 200 and found.json()["results"][0]["name"] == "cat.jpg"
    finally:
        _release_readers(fifo)


def _release_readers(fifo: Path) -> None:
    """Open the FIFO for writing once, so a reader stuck on it (the server before this fix) goes on."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        assert exc.errno == errno.ENXIO  # nobody is reading: as it should be


# -- 3. Host header and access token ---------------------------------------------------------------------


def test_host_names_are_parsed_and_loopback_names_accepted_on_loopback() -> None:
    from lookalike.serve.access import connection_names, host_name

    assert [host_name(h) for h in ("LocalHost:8000", "[::1]:80", "[::1]", "::1", "photos.example.", "")] == [
        "localhost",
        "::1",
        "::1",
        "::1",
        "photos.example",
        "",
    ]
    assert connection_names(("127.0.0.1", 8000)) >= {"127.0.0.1", "localhost", "::1"}
    assert connection_names(("::ffff:127.0.0.1", 8000)) >= {"localhost", "127.0.0.1"}
    assert connection_names(("192.168.1.5", 8000)) == {"192.168.1.5"}
    assert connection_names(None) == frozenset()


def test_a_foreign_host_header_is_421(plain: Server) -> None:
    for foreign in ("evil.example", "evil.example:80", "localhost.evil.example", "127.0.0.2"):
        response = plain.client.get("/api/health", headers={"host": foreign})
        assert "--allowed-host" in assert_error(response, 421, "unknown host")["detail"]
        assert_error(plain.client.get("/", headers={"host": foreign}), 421)
    port = plain.url.rsplit(":", 1)[1]
    for own in (f"127.0.0.1:{port}", "localhost", f"LOCALHOST.:{port}", "[::1]", f"[::1]:{port}"):
        assert plain.client.get("/api/health", headers={"host": own}).status_code == 200, own


def test_every_api_request_needs_the_token(guarded: Server, ids: dict[str, int]) -> None:
    client, cat = guarded.client, ids["cat.jpg"]
    for url in ("/api/health", "/api/info", f"/api/images/{cat}", f"/api/thumbs/{cat}"):
        response = client.get(url)
        assert_error(response, 401, "access token needed")
        assert response.headers["www-authenticate"] == "Bearer"
        assert_error(client.get(url, headers={"authorization": f"Bearer {TOKEN[:-1]}x"}), 401)
        assert client.get(url, headers={"authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert_error(upload(client), 401)
    assert upload(client, authorization=f"Bearer {TOKEN}").status_code == 200
    assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
    # an allowed host name still needs the token; a foreign one is refused before it is asked for
    auth = {"authorization": f"Bearer {TOKEN}"}
    assert client.get("/api/health", headers={"host": "photos.example:8443", **auth}).status_code == 200
    assert_error(client.get("/api/health", headers={"host": "photos.example"}), 401)
    assert_error(client.get("/api/health", headers={"host": "evil.example", **auth}), 421)


def test_the_token_in_the_address_sets_a_strict_cookie_that_opens_the_api(
    guarded: Server, ids: dict[str, int]
) -> None:
    client = guarded.client
    assert_error(client.get("/", params={"token": "not-the-token-at-all-0000"}), 401)
    assert client.get("/", params={"xtoken": "1"}).status_code == 200  # the page needs no token
    opened = client.get("/", params={"token": TOKEN}, follow_redirects=False)
    assert opened.status_code == 303 and opened.headers["location"] == "/"
    cookie = opened.headers["set-cookie"]
    assert TOKEN in cookie and "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    name_value = cookie.split(";")[0]
    with httpx.Client(base_url=guarded.url, timeout=10, headers={"cookie": name_value}) as browser:
        assert browser.get("/api/info").status_code == 200
        assert browser.get(f"/api/thumbs/{ids['cat.jpg']}").status_code == 200
    name = name_value.split("=")[0]
    assert_error(client.get("/api/info", headers={"cookie": f"{name}=wrong"}), 401)


def test_serve_refuses_to_listen_beyond_loopback_without_a_token(indexed: dict[str, Path]) -> None:
    def serve(host: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "lookalike", "serve", "-c", str(indexed["collection"])]
        env = {k: v for k, v in os.environ.items() if k != "LOOKALIKE_TOKEN"}
        env |= {"LOOKALIKE_TOKEN": token} if token else {}
        return subprocess.run(
            [*command, "--host", host, "--port", "9"], capture_output=True, text=True, env=env, timeout=60
        )

    refused = serve("0.0.0.0")
    assert refused.returncode == 1, refused.stderr
    assert "error:" in refused.stderr and "--token" in refused.stderr
    assert "Traceback" not in refused.stderr
    weak = serve("::", token="short")  # read from LOOKALIKE_TOKEN, refused, and never shown
    assert weak.returncode == 1 and "at least 16 characters" in weak.stderr, weak.stderr
    assert "Traceback" not in weak.stderr and "short" not in weak.stderr


def test_the_access_log_never_shows_a_token() -> None:
    from lookalike.cli.serve import _hide_tokens

    record = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s"', ("c", "GET", ""), None)
    for path, shown in [
        (f"/?token={TOKEN}", "/?token=***"),
        (f"/?a=1&token={TOKEN}&b=2", "/?a=1&token=***&b=2"),
        ("/api/health", "/api/health"),
    ]:
        record.args = ("127.0.0.1:5000", "GET", path)
        assert _hide_tokens(record) and record.getMessage() == f'127.0.0.1:5000 - "GET {shown}"'


# -- 4. slow bodies and HEAD -----------------------------------------------------------------------------


def test_a_trickled_body_gets_408_in_time_and_others_are_answered_meanwhile(guarded: Server) -> None:
    port = int(guarded.url.rsplit(":", 1)[1])
    head = (
        "POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        "Content-Type: multipart/form-data; boundary=x\r\nContent-Length: 100000\r\n\r\n"
        '--x\r\nContent-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
    )
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=0.1) as slow:
        started = time.monotonic()
        slow.sendall(head.encode())
        meanwhile = guarded.client.get("/api/health", headers={"authorization": f"Bearer {TOKEN}"})
        assert meanwhile.status_code == 200 and time.monotonic() - started < TIMEOUT
        while time.monotonic() - started < TIMEOUT + 2:
            try:
                slow.sendall(b"\xff")  # a byte of the image, every 0.1 s
                chunk = slow.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                break  # the server closed the connection
            if not chunk:
                break
            answer += chunk
            if b"\r\n\r\n" in answer and answer.endswith(b"}"):
                break
        elapsed = time.monotonic() - started
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert b'"request timeout"' in answer
    assert TIMEOUT <= elapsed < TIMEOUT + 1.5


def test_head_answers_the_headers_of_get(
    plain: Server, ids: dict[str, int], indexed: dict[str, Path]
) -> None:
    client, cat = plain.client, ids["cat.jpg"]
    original = client.head(f"/api/images/{cat}")
    assert original.status_code == 200 and original.content == b""
    assert original.headers["content-type"] == "image/jpeg"
    assert int(original.headers["content-length"]) == (indexed["photos"] / "cat.jpg").stat().st_size
    thumb = client.head(f"/api/thumbs/{cat}")
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    assert client.head("/").status_code == 200 and client.head("/api/health").status_code == 200
    assert client.head("/api/images/987654").status_code == 404
    assert client.head(f"/api/images/{2**63}").status_code == 422


def test_openapi_stays_valid_with_64_bit_ids_and_no_head_operations(plain: Server) -> None:
    schema = plain.client.get("/openapi.json").json()
    operations = [op for item in schema["paths"].values() for op in item.values()]
    ids_ = [op["operationId"] for op in operations]
    assert len(ids_) == len(set(ids_))
    assert not any("head" in item for item in schema["paths"].values())
    (parameter,) = schema["paths"]["/api/images/{image_id}"]["get"]["parameters"]
    assert parameter["schema"]["maximum"] == 2**63 - 1
    body = schema["paths"]["/api/search"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["id"]["format"] == "int64"


@pytest.mark.browser
def test_the_page_opened_with_the_token_searches_and_shows_thumbnails(guarded: Server) -> None:
    """In Chromium: /?token= sets the cookie and drops the token from the address; the page's own requests
    (info, search, thumbnails) then carry it; a fresh browser without it is told what to do."""
    from tests.test_browser import CHROMIUM, wait_for_thumbnails

    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(bypass_csp=True)  # for wait_for_function, as in test_browser
            page.set_default_timeout(30_000)
            page.goto(f"{guarded.url}/")
            page.locator("#error").wait_for()
            assert "access token" in page.locator("#error").inner_text()
            page.goto(f"{guarded.url}/?token={TOKEN}")
            assert page.url == f"{guarded.url}/"
            page.wait_for_function("document.getElementById('collection').textContent.includes('5 images')")
            page.set_input_files("#file", str(SAMPLE / "cat.jpg"))
            page.locator("#results .tile").nth(4).wait_for()
            assert page.locator("#results .tile .name").first.inner_text() == "cat.jpg"
            wait_for_thumbnails(page)
        finally:
            browser.close()
