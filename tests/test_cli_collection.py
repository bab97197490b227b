"""`lookalike index | search | info | remove | export | whiten` through the real entry point (subprocesses).

The folder is indexed once; the commands that follow only read it, or work on copies of the collection, so
they run side by side (two at a time) and each test checks the outcome of its own command.
"""

from __future__ import annotations

import csv
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lookalike.collection import Collection
from tests.conftest import json_lines, require_weights, succeeded
from tests.conftest import run_cli as run
from tests.corpus import SAMPLE_PHOTOS, copy_sample, encode, variant

pytestmark = pytest.mark.weights

NAMES = sorted(p.name for p in SAMPLE_PHOTOS)
SETTINGS = ("--imsize", "128", "--precision", "fp32")
Ran = dict[str, list[subprocess.CompletedProcess[str]]]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample photos and one broken file, in a folder whose name is not ASCII."""
    require_weights("resnet50.keras-imagenet")
    folder = copy_sample(tmp_path_factory.mktemp("cli") / "photos é")
    whole = (folder / "cells.jpg").read_bytes()
    (folder / "broken.jpg").write_bytes(whole[: len(whole) // 3])
    return folder


@pytest.fixture(scope="module")
def first_index(photos: Path) -> dict:
    return json_lines(succeeded(run("index", str(photos), *SETTINGS, "--json")).stdout)[0]


@pytest.fixture(scope="module")
def collection(photos: Path, first_index: dict) -> Path:
    return photos / ".lookalike"


@pytest.fixture(scope="module")
def second_index(photos: Path, collection: Path) -> dict:
    return json_lines(succeeded(run("index", str(photos), "--json")).stdout)[0]


@pytest.fixture(scope="module")
def cat_id(collection: Path) -> int:
    with Collection.open(collection, readonly=True) as opened:
        return opened.record("cat.jpg").id


@pytest.fixture(scope="module")
def ran(
    photos: Path, collection: Path, second_index: dict, cat_id: int, tmp_path_factory: pytest.TempPathFactory
) -> Ran:
    """Every later command, run two at a time: name → results of its chain of commands, in order."""
    work = tmp_path_factory.mktemp("commands")
    queries = work / "queries"
    queries.mkdir()
    shutil.copy(photos / "cat.jpg", queries / "a cat.jpg")
    (queries / "mirrored coffee.jpg").write_bytes(
        encode(ImageOps.mirror(variant(photos / "coffee.jpg", "whole")), "JPEG")
    )
    labelled = work / "labelled"
    for label, stems in {
        "cat": ("cat", "cat-crop-flip"),
        "coffee": ("coffee", "coffee-rotated-dark"),
    }.items():
        (labelled / label).mkdir(parents=True)
        for stem in stems:
            shutil.copy(photos / f"{stem}.jpg", labelled / label / f"{stem}.jpg")
            (labelled / label / f"{stem}-flip.jpg").write_bytes(
                encode(variant(photos / f"{stem}.jpg", "flip"), "JPEG")
            )
    copies = {}
    for name in ("remove", "pca", "learned", "mismatch"):
        copies[name] = shutil.copytree(collection, work / f"copy for {name}")
    c = str(collection)
    cat = str(photos / "cat.jpg")
    chains: dict[str, list[tuple[str, ...]]] = {
        "search file": [("search", cat, "-c", c, "--json", "-k", "3")],
        "search aqe": [("search", cat, "-c", c, "--json", "-k", "3", "--rerank", "aqe")],
        "search chain": [("search", cat, "-c", c, "--json", "-k", "3", "--rerank", "dba,aqe:n=1")],
        "search folder chain": [
            ("search", str(queries), "-c", c, "--json", "-k", "2", "--rerank", "dba+aqe")
        ],
        "search bad chain": [("search", cat, "-c", c, "--rerank", "aqe:m=1")],
        "search folder": [("search", str(queries), "-c", c, "--json", "-k", "2")],
        "search id": [("search", f"id:{cat_id}", "-c", c, "--json", "-k", "3")],
        "search bad id": [("search", "id:cat", "-c", c)],
        "search bbox": [("search", cat, "-c", c, "--bbox", "0,0,192,255", "--json", "-k", "2")],
        "info": [("info", "--json")],
        "export": [("export", "-o", str(work / "export"), "-c", c, "--json")],
        "remove": [
            ("remove", "cat.jpg", "-c", str(copies["remove"])),
            ("info", "--json", "-c", str(copies["remove"])),
            ("search", f"id:{cat_id}", "-c", str(copies["remove"])),
        ],
        "pca": [
            ("whiten", "fit", "-c", str(copies["pca"])),
            ("info", "--json", "-c", str(copies["pca"])),
            ("search", cat, "-c", str(copies["pca"]), "--json", "-k", "3"),
        ],
        "learned": [
            ("whiten", "fit", "--labelled", str(labelled), "--dim", "16", "-c", str(copies["learned"])),
            ("search", f"id:{cat_id}", "-c", str(copies["learned"]), "--json", "-k", "3"),
        ],
        "mismatch": [("index", str(photos), "-c", str(copies["mismatch"]), "--imsize", "160")],
    }
    environment = {"LOOKALIKE_COLLECTION": c}

    def run_chain(commands: list[tuple[str, ...]]) -> list[subprocess.CompletedProcess[str]]:
        return [run(*command, env=environment) for command in commands]

    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_chain, chain) for name, chain in chains.items()}
        results = {name: future.result() for name, future in futures.items()}
    return results


def hits_of(result: subprocess.CompletedProcess[str]) -> list[dict]:
    return json_lines(succeeded(result).stdout)


# -- index -----------------------------------------------------------------------------------------------


def test_index_reports_what_it_did_as_json(first_index: dict, collection: Path) -> None:
    assert (first_index["indexed"], first_index["reused"], first_index["unchanged"]) == (len(NAMES), 0, 0)
    assert [f["path"] for f in first_index["failed"]] == ["broken.jpg"]
    assert "truncated" in first_index["failed"][0]["error"]
    assert first_index["collection"]["images"] == len(NAMES)
    assert Path(first_index["collection"]["path"]) == collection
    assert (collection / "collection.sqlite").exists()


def test_index_again_finds_everything_unchanged(second_index: dict) -> None:
    assert (second_index["indexed"], second_index["unchanged"], second_index["removed"]) == (
        0,
        len(NAMES) + 1,
        0,
    )
    assert second_index["failed"] == []


def test_index_with_other_settings_asks_for_rebuild(ran: Ran) -> None:
    [result] = ran["mismatch"]
    assert result.returncode == 1, result.stdout + result.stderr
    assert "--rebuild" in result.stderr and "imsize" in result.stderr
    assert "Traceback" not in result.stderr


# -- search ----------------------------------------------------------------------------------------------


def test_search_a_file_gives_ranked_json_lines(ran: Ran, photos: Path) -> None:
    hits = hits_of(ran["search file"][0])
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert [h["path"] for h in hits[:2]] == ["cat.jpg", "cat-crop-flip.jpg"]
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert {h["query"] for h in hits} == {str(photos / "cat.jpg")}
    assert all(set(h) == {"query", "rank", "id", "path", "score"} for h in hits)


def test_search_with_query_expansion(ran: Ran) -> None:
    plain, expanded = hits_of(ran["search file"][0]), hits_of(ran["search aqe"][0])
    assert [h["path"] for h in expanded[:2]] == ["cat.jpg", "cat-crop-flip.jpg"]
    assert expanded[0]["score"] < plain[0]["score"]  # the expanded query is no longer the photo itself


def test_search_with_a_chain_of_rerankers(ran: Ran, collection: Path, photos: Path, cat_id: int) -> None:
    """`--rerank dba,aqe:n=1` gives what the library gives for the same chain: cat.jpg is indexed and
    unchanged, so it is that image, never its own neighbour; its copy in the query folder is not indexed,
    so it is a new photo with the same descriptor (the `+` spelling is accepted too)."""
    with Collection.open(collection, readonly=True) as opened:
        expected = opened.search(photos / "cat.jpg", k=3, rerank="dba,aqe:n=1")
        copy = opened.search_vectors(opened.vectors_of([cat_id]), k=2, rerank="dba,aqe")[0]
    hits = hits_of(ran["search chain"][0])
    assert [(h["id"], h["path"]) for h in hits] == [(h.id, h.path) for h in expected]
    assert [h["score"] for h in hits] == pytest.approx([h.score for h in expected], abs=1e-6)
    assert hits[0]["path"] == "cat.jpg"
    of_copy = [h for h in hits_of(ran["search folder chain"][0]) if Path(h["query"]).name == "a cat.jpg"]
    assert [h["id"] for h in of_copy] == [h.id for h in copy]
    assert [h["score"] for h in of_copy] == pytest.approx([h.score for h in copy], abs=1e-4)


def test_search_with_a_bad_chain_is_a_usage_error(ran: Ran) -> None:
    [result] = ran["search bad chain"]
    assert result.returncode == 2, result.stderr
    assert "no option 'm'" in result.stderr and "aqe:n=2,alpha=3.0" in result.stderr
    assert "Traceback" not in result.stderr


def test_search_by_id_matches_search_by_file(ran: Ran, cat_id: int) -> None:
    by_id, by_file = hits_of(ran["search id"][0]), hits_of(ran["search file"][0])
    assert by_id[0]["id"] == cat_id
    assert [(h["id"], h["path"]) for h in by_id] == [(h["id"], h["path"]) for h in by_file]
    assert [h["score"] for h in by_id] == pytest.approx([h["score"] for h in by_file], abs=1e-6)


def test_search_a_bad_id_is_a_usage_error(ran: Ran) -> None:
    [result] = ran["search bad id"]
    assert result.returncode == 2, result.stderr
    assert "id:N" in result.stderr and "Traceback" not in result.stderr


def test_search_a_folder_answers_each_query(ran: Ran) -> None:
    hits = hits_of(ran["search folder"][0])
    by_query: dict[str, list[dict]] = {}
    for hit in hits:
        by_query.setdefault(Path(hit["query"]).name, []).append(hit)
    assert sorted(by_query) == ["a cat.jpg", "mirrored coffee.jpg"]
    assert [h["path"] for h in by_query["a cat.jpg"]] == ["cat.jpg", "cat-crop-flip.jpg"]
    assert by_query["a cat.jpg"][0]["score"] > 0.99
    assert by_query["mirrored coffee.jpg"][0]["path"] in ("coffee.jpg", "coffee-rotated-dark.jpg")


def test_search_with_a_bbox_describes_the_crop(ran: Ran) -> None:
    hits = hits_of(ran["search bbox"][0])
    assert {h["path"] for h in hits} == {"cat.jpg", "cat-crop-flip.jpg"}
    assert hits[0]["score"] < 0.99  # half the image is not the whole image


# -- info, remove, export --------------------------------------------------------------------------------


def test_info_describes_the_collection(ran: Ran, collection: Path) -> None:
    [record] = json_lines(succeeded(ran["info"][0]).stdout)  # found through $LOOKALIKE_COLLECTION
    assert Path(record["path"]) == collection
    assert (record["images"], record["failed"], record["distinct_contents"]) == (len(NAMES), 1, len(NAMES))
    assert record["settings"]["imsize"] == 128 and record["settings"]["dim"] == 2048
    assert record["whitening"] is None and record["schema_version"] >= 1
    assert record["disk_bytes"] > len(NAMES) * 2048 * 4


def test_remove_forgets_an_image(ran: Ran, cat_id: int) -> None:
    removed, info, search = ran["remove"]
    assert "removed 1 of 1" in succeeded(removed).stdout
    assert json_lines(succeeded(info).stdout)[0]["images"] == len(NAMES) - 1
    assert search.returncode == 1 and f"image {cat_id} is not indexed" in search.stderr


def test_export_writes_plain_arrays_and_a_csv(ran: Ran, collection: Path) -> None:
    written = json_lines(succeeded(ran["export"][0]).stdout)[0]
    descriptors = np.load(written["descriptors"], allow_pickle=False)
    with open(written["images"], newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert descriptors.shape == (len(NAMES), 2048) and descriptors.dtype == np.float32
    assert sorted(r["path"] for r in rows) == NAMES
    with Collection.open(collection, readonly=True) as opened:
        for index, (row, vector) in enumerate(zip(rows, descriptors, strict=True)):
            assert int(row["index"]) == index
            np.testing.assert_array_equal(vector, opened.vector(int(row["id"])))


# -- whitening -------------------------------------------------------------------------------------------


def test_pca_whitening_is_fitted_and_search_still_works(ran: Ran) -> None:
    fitted, info, search = ran["pca"]
    assert "pca whitening 2048 → 9" in succeeded(fitted).stdout
    assert json_lines(succeeded(info).stdout)[0]["whitening"] == "pca"
    hits = hits_of(search)
    assert hits[0]["path"] == "cat.jpg" and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    raw_scores = [h["score"] for h in hits_of(ran["search file"][0])]
    assert [h["score"] for h in hits] != pytest.approx(raw_scores, abs=1e-3)


def test_learned_whitening_from_a_labelled_folder(ran: Ran, cat_id: int) -> None:
    fitted, search = ran["learned"]
    assert "learned whitening 2048 → 16" in succeeded(fitted).stdout
    hits = hits_of(search)
    assert hits[0]["id"] == cat_id and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert hits[1]["path"] == "cat-crop-flip.jpg"


def test_index_keeps_local_features_and_search_verifies_with_them(photos: Path, tmp_path: Path) -> None:
    """`index --local-features sift` stores features for every content (counted by `info`), and
    `search --rerank sv` puts the photo a rotated, cropped copy was made of first, its score raised by the
    inliers; a later `index --local-features none` stops computing them for new photos."""
    folder = tmp_path / "photos"
    shutil.copytree(photos, folder, ignore=shutil.ignore_patterns(".lookalike", "broken.jpg"))
    target = tmp_path / "collection"
    indexed = run("index", str(folder), "-c", str(target), *SETTINGS, "--local-features", "sift", "--json")
    contents = json_lines(succeeded(indexed).stdout)[0]["indexed"]
    info = json_lines(succeeded(run("info", "-c", str(target), "--json")).stdout)[0]
    [(identity, stored)] = info["local_features"].items()
    assert identity.startswith("sift") and stored["images"] == contents and stored["bytes"] > 1000
    with Image.open(folder / "motorcycle-left.jpg") as original:
        original.rotate(10).crop((30, 20, original.width - 40, original.height - 30)).save(tmp_path / "q.jpg")
    found = run(
        "search", str(tmp_path / "q.jpg"), "-c", str(target), "-k", "3", "--rerank", "sv:features=sift"
    )
    hits = json_lines(succeeded(found).stdout)
    assert hits[0]["path"] == "motorcycle-left.jpg" and hits[0]["score"] > 1.0
    bad = run("index", str(folder), "-c", str(target), "--local-features", "surf")
    assert bad.returncode == 1 and "features are one of xfeat, sift" in bad.stderr
    succeeded(run("index", str(folder), "-c", str(target), "--local-features", "none", "--json"))
    with Collection.open(target, readonly=True) as opened:
        assert opened.local_settings is None
