"""The search page in a real headless Chromium (Debian's), driven by Playwright, against the real server:
upload a UKBench photo through the file input, see its group on top, open a result and search with it,
check the phone layout and that nothing is loaded from anywhere but the server."""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lookalike.collection import Collection
from lookalike.extract import DescriptorSettings
from tests.conftest import SHARED_DATA, require_weights

CHROMIUM = Path("/usr/bin/chromium")
UKBENCH = SHARED_DATA / "ukbench-sample"
DOCS_SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshot.png"
QUERY = "ukbench00000.jpg"
GROUP = [f"ukbench{i:05d}.jpg" for i in range(4)]  # UKBench: four photos of one object, numbered in a row

pytestmark = [pytest.mark.browser, pytest.mark.weights]


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real server (uvicorn, in a thread) on a free loopback port, over the UKBench sample read in place."""
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM} (install.sh installs Debian's chromium)")
    pytest.importorskip("playwright.sync_api", reason="playwright is in the dev extra")
    if not (UKBENCH / QUERY).exists():
        pytest.skip(f"the UKBench sample is not at {UKBENCH}")
    require_weights("resnet50.keras-imagenet")
    from lookalike.serve import create_app

    path = tmp_path_factory.mktemp("browser") / "collection"
    with Collection.create(
        path, DescriptorSettings(imsize=256, precision="fp32"), root=UKBENCH
    ) as collection:
        collection.sync()
    with serving(create_app(path)) as url:
        yield url


@contextmanager
def serving(app: object) -> Iterator[str]:
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))  # bound here, so no other process can take the port meanwhile
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        listener.close()


@pytest.fixture
def browser_page(base_url: str, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            tmp_path / "chromium-profile",  # a fresh profile for every test
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
            viewport={"width": 1200, "height": 820},
            bypass_csp=True,  # the page's CSP forbids eval, which Playwright's wait_for_function uses
        )
        page = context.new_page()
        page.set_default_timeout(60_000)
        requested: list[str] = []
        page.on("request", lambda request: requested.append(request.url))
        problems: list[str] = []
        page.on("pageerror", lambda error: problems.append(str(error)))
        page.on("console", lambda message: message.type == "error" and problems.append(message.text))
        # (an answer of 4xx is logged to the console as an error too: the tests that expect one say so)
        try:
            yield page, requested, problems
        finally:
            context.close()
    elsewhere = [url for url in requested if not url.startswith((base_url, "blob:", "data:"))]
    assert not elsewhere, f"the page loaded from elsewhere: {elsewhere}"


def result_names(page) -> list[str]:
    return page.locator("#results .tile .name").all_inner_texts()


def wait_for_thumbnails(page) -> None:
    page.wait_for_function(
        "[...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"
    )


def test_upload_see_results_then_search_with_a_result(browser_page, base_url: str, tmp_path: Path) -> None:
    page, _, problems = browser_page
    page.goto(base_url)
    page.wait_for_function("document.getElementById('collection').textContent.includes('10 images')")

    page.set_input_files("#file", str(UKBENCH / QUERY))
    page.locator("#results .tile").nth(9).wait_for()
    assert page.locator("#progress").is_hidden()
    names = result_names(page)
    assert len(names) >= 10
    assert names[0] == QUERY
    assert sorted(names[:4]) == GROUP, f"top 4 for {QUERY}: {names[:4]}"
    assert page.locator("#query-name").inner_text() == QUERY
    wait_for_thumbnails(page)
    shot = tmp_path / "screenshot.png"
    page.screenshot(path=shot)
    save_docs_screenshot(shot)

    second = page.locator("#results .tile button").nth(1)
    clicked = result_names(page)[1]
    second.click()
    viewer = page.locator("#viewer")
    viewer.wait_for(state="visible")
    page.wait_for_function("document.getElementById('viewer-image').naturalWidth > 0")
    assert page.locator("#viewer-name").inner_text() == clicked
    page.get_by_role("button", name="Search with this image").click()
    assert viewer.is_hidden()
    page.wait_for_function(
        "name => document.querySelector('#results .tile .name')?.textContent === name"
        " && document.getElementById('query-name').textContent === name"
        " && document.getElementById('progress').hidden",
        arg=clicked,
    )
    assert page.evaluate("location.hash").startswith("#id=")
    assert len(result_names(page)) == 10
    wait_for_thumbnails(page)
    assert not problems


def test_the_page_reranks_with_the_chain_typed(browser_page, base_url: str, tmp_path: Path) -> None:
    """The page's re-ranking field takes the API's chain: a rotated, cropped copy searched with `sv` comes
    back first, verified; changing the chain searches again; a chain that is not one says why."""
    page, _, problems = browser_page
    page.goto(base_url)
    page.wait_for_function("document.getElementById('collection').textContent.includes('10 images')")
    with Image.open(UKBENCH / "ukbench00004.jpg") as original:
        original.rotate(12).crop((60, 40, 560, 420)).save(tmp_path / "copy.jpg", quality=85)
    page.fill("#rerank", "sv:features=sift,top=10")
    page.set_input_files("#file", str(tmp_path / "copy.jpg"))
    page.wait_for_function("document.querySelectorAll('#results .tile').length >= 10")
    page.wait_for_function("document.getElementById('progress').hidden")
    assert result_names(page)[0] == "ukbench00004.jpg"
    page.fill("#rerank", "magic")
    page.locator("#rerank").dispatch_event("change")
    page.locator("#error").wait_for(state="visible")
    assert "unknown re-ranker 'magic'" in page.locator("#error").inner_text()
    assert problems and all("422" in problem for problem in problems)  # the refused search, logged


DELIVER = """async ([how, url, name]) => {
    const blob = await (await fetch(url)).blob();
    const data = new DataTransfer();
    data.items.add(new File([blob], name, {type: blob.type}));
    if (how === "paste") document.dispatchEvent(new ClipboardEvent("paste", {clipboardData: data}));
    else document.getElementById("drop").dispatchEvent(
        new DragEvent("drop", {dataTransfer: data, bubbles: true, cancelable: true}));
}"""


@pytest.mark.parametrize("how", ["drop", "paste"])
def test_dropped_or_pasted_image_is_searched(browser_page, base_url: str, how: str) -> None:
    page, _, problems = browser_page
    page.goto(base_url)
    page.wait_for_function("document.getElementById('collection').textContent.includes('images')")
    photo = UKBENCH / "ukbench00004.jpg"
    found = httpx.post(
        f"{base_url}/api/search", files={"image": (photo.name, photo.read_bytes())}, timeout=60
    )
    image_id = found.json()["results"][0]["id"]
    page.evaluate(DELIVER, [how, f"/api/images/{image_id}", f"{how}ped.jpg"])
    page.wait_for_function("document.querySelectorAll('#results .tile').length >= 10")
    assert result_names(page)[0] == photo.name
    assert page.locator("#query-name").inner_text() == f"{how}ped.jpg"
    assert not problems


def test_a_file_that_is_not_an_image_shows_why(browser_page, base_url: str, tmp_path: Path) -> None:
    page, _, problems = browser_page
    page.goto(base_url)
    (tmp_path / "notes.jpg").write_text("not a photo\n")
    page.set_input_files("#file", str(tmp_path / "notes.jpg"))
    error = page.locator("#error")
    error.wait_for()
    assert error.inner_text().startswith("unsupported image")
    assert page.locator("#results .tile").count() == 0
    page.locator("#query-image").wait_for(state="hidden")  # the browser cannot show it either
    assert all("415" in problem for problem in problems), problems


def test_phone_layout_has_two_columns(browser_page, base_url: str) -> None:
    page, _, problems = browser_page
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(f"{base_url}/#id=1")  # a shared link searches with that image
    page.locator("#results .tile").nth(9).wait_for()
    columns = page.evaluate("getComputedStyle(document.getElementById('results')).gridTemplateColumns")
    assert len(columns.split()) == 2, columns
    page.screenshot(path="/tmp/phone.png")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    assert not problems


def test_api_docs_render_offline(browser_page, base_url: str) -> None:
    page, _, _ = browser_page
    page.goto(f"{base_url}/docs")
    page.locator(".opblock").nth(4).wait_for()
    assert "/api/search" in page.locator(".swagger-ui").inner_text()


def test_a_labelled_collection_also_says_what_the_image_shows(
    labelled: dict[str, Path], tmp_path: Path
) -> None:
    from playwright.sync_api import sync_playwright

    from lookalike.serve import create_app

    with serving(create_app(labelled["collection"])) as url, sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        try:
            page = browser.new_page(bypass_csp=True)  # for wait_for_function, as in browser_page
            page.set_default_timeout(60_000)
            page.goto(url)
            page.wait_for_function("document.getElementById('collection').textContent.includes('images')")
            page.set_input_files("#file", str(labelled["queries"] / "coffee.jpg"))
            label = page.locator("#label")
            label.wait_for()
            assert label.locator("strong").inner_text() == "coffee"
            assert "confidence" in label.inner_text() and "of 7 neighbours" in label.inner_text()
            assert result_names(page)[0] in {"whole.jpg", "flip.jpg", "crop.jpg"}
            page.locator("#results .tile button").nth(0).click()
            page.get_by_role("button", name="Search with this image").click()
            page.wait_for_function(
                "document.getElementById('query-name').textContent.endsWith('.jpg')"
                " && !document.getElementById('label').hidden"
            )
            assert label.locator("strong").inner_text() == "coffee"
        finally:
            browser.close()


def save_docs_screenshot(shot: Path) -> None:
    """docs/screenshot.png for the README: written when missing, or when LOOKALIKE_UPDATE_SCREENSHOT=1
    (so a test run does not rewrite a tracked file each time); a 256-colour PNG keeps it small."""
    if DOCS_SCREENSHOT.exists() and os.environ.get("LOOKALIKE_UPDATE_SCREENSHOT") != "1":
        return
    with Image.open(shot) as image:
        small = image.convert("RGB").quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    partial = DOCS_SCREENSHOT.with_name(".screenshot.png.partial")
    small.save(partial, "PNG", optimize=True)
    os.replace(partial, DOCS_SCREENSHOT)
