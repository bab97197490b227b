"""A collection's local features (spatial verification): stored per content at index time in the commit that
records the content, read back by ``search(..., rerank="sv")`` instead of describing candidates again,
computed on demand (stored when writable, kept in memory when read-only), removed with their content, and
consistent after a SIGKILL. SIFT throughout: no weights beyond the global model, and quick."""

from __future__ import annotations

import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from lookalike.collection import Collection, SyncProgress, store
from lookalike.collection.local import LocalFeatureSettings
from lookalike.errors import ConfigError
from lookalike.extract import DescriptorSettings
from lookalike.images import load_image
from lookalike.local import LocalFeatures, SiftDescriber, local_describer
from tests.conftest import SAMPLE
from tests.corpus import (
    copy_sample,
    photo_family,
    shared_resnet50_network,  # noqa: F401 (autouse fixture)
)
from tests.test_collection_reliability import committed_images, index_command, wait_for
from tests.test_local_features import CALTECH, edited

SETTINGS = DescriptorSettings(imsize=128, precision="fp32")
INDEX_OPTIONS = ("--imsize", "128", "--precision", "fp32", "--quiet")
SIFT = LocalFeatureSettings("sift")
SV = "sv:features=sift"
IDENTITY = SIFT.describer().identity

pytestmark = pytest.mark.weights


def photo_folder(folder: Path) -> Path:
    """The 10 sample photos, two Caltech motorbikes, and a second file with the content of rocket.jpg:
    13 images, 12 contents."""
    copy_sample(folder)
    for path in sorted((CALTECH / "Motorbikes").glob("*.jpg"))[:2]:
        shutil.copy2(path, folder / f"motorbike-{path.name}")
    shutil.copy2(folder / "rocket.jpg", folder / "rocket again.jpg")
    return folder


def indexed(base: Path, local: LocalFeatureSettings | None) -> Collection:
    collection = Collection.create(base / "collection", SETTINGS, root=photo_folder(base / "photos"))
    if local is not None:
        collection.set_local_settings(local)
    collection.sync()
    return collection


@pytest.fixture(scope="module")
def with_features(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collection]:
    collection = indexed(tmp_path_factory.mktemp("with"), SIFT)
    yield collection
    collection.close()


@pytest.fixture(scope="module")
def query(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An edited copy of an indexed photo, outside the collection's root."""
    path = tmp_path_factory.mktemp("query") / "motorcycle edited.jpg"
    edited(load_image(SAMPLE / "motorcycle-left.jpg")).save(path, quality=90)
    return path


@pytest.fixture
def described(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int]]:
    """The sizes of the images SIFT describes from now on."""
    calls: list[tuple[int, int]] = []
    describe = SiftDescriber.describe

    def counted(self: SiftDescriber, image: Image.Image) -> LocalFeatures:
        calls.append(image.size)
        return describe(self, image)

    monkeypatch.setattr(SiftDescriber, "describe", counted)
    return calls


def stored_features(collection: Path) -> dict[str, bytes]:
    """sha256 → stored SIFT features, read straight from the database (read-only)."""
    database = collection / "collection.sqlite"
    with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT sha256, data FROM local_features WHERE identity = ?", (IDENTITY,)))


def sha_of(collection: Collection, name: str) -> str:
    record = collection.record(name)
    assert record is not None and record.sha256 is not None
    return record.sha256


def content_hashes(collection: Collection) -> set[str]:
    return {sha for _, sha, _ in store.all_contents(collection.db)}


# -- stored at index time --------------------------------------------------------------------------------


def test_indexing_stores_features_for_every_content(with_features: Collection) -> None:
    info = with_features.info()
    assert (info.images, info.distinct_contents) == (13, 12)
    assert info.local_features is not None and set(info.local_features) == {IDENTITY}
    assert info.local_features[IDENTITY]["images"] == info.distinct_contents
    stored = stored_features(with_features.path)
    assert set(stored) == content_hashes(with_features)
    assert info.local_features[IDENTITY]["bytes"] == sum(len(data) for data in stored.values())
    describer = local_describer("sift")
    for record in with_features.images().values():
        image = load_image(with_features.absolute_path(record.path))
        assert stored[record.sha256 or ""] == describer.describe(image).to_bytes(), record.path
    with Collection.open(with_features.path, readonly=True) as reopened:
        assert reopened.local_settings == SIFT


def test_local_settings_are_checked_and_can_be_switched_off(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="features are one of xfeat, sift"):
        LocalFeatureSettings("orb")
    with Collection.create(tmp_path / "c", SETTINGS) as collection:
        assert collection.local_settings is None
        collection.set_local_settings(LocalFeatureSettings("sift", 512, 320))
        assert collection.local_settings == LocalFeatureSettings("sift", 512, 320)
        collection.set_local_settings(None)
        assert collection.local_settings is None
        assert collection.info().local_features == {}


@pytest.mark.parametrize(("keypoints", "size"), [(5, 640), (1024, 10), (100_000, 640)])
def test_local_settings_out_of_bounds_are_refused_before_a_collection_records_them(
    keypoints: int, size: int
) -> None:
    """Recorded, they would make every later index fail until someone changes them."""
    with pytest.raises(ConfigError):
        LocalFeatureSettings("sift", keypoints, size)


def test_sv_search_reads_the_stored_features(
    with_features: Collection, query: Path, described: list[tuple[int, int]]
) -> None:
    plain = {hit.path: hit.score for hit in with_features.search(query, k=13)}
    hits = with_features.search(query, k=13, rerank=SV)
    assert len(described) == 1  # the query; no candidate is described again
    assert hits[0].path == "motorcycle-left.jpg"
    assert hits[0].score > plain["motorcycle-left.jpg"] + 0.4  # verified
    assert {hit.path for hit in hits} == set(plain)
    described.clear()
    files = with_features.search_files([query], k=3, rerank=SV)
    assert len(described) == 1 and files[0].hits[0].path == "motorcycle-left.jpg"


def test_sv_search_by_an_indexed_image_describes_nothing(
    with_features: Collection, described: list[tuple[int, int]]
) -> None:
    record = with_features.record("motorcycle-left.jpg")
    assert record is not None
    by_path = with_features.search(with_features.absolute_path("motorcycle-left.jpg"), k=3, rerank=SV)
    by_id = with_features.search(record.id, k=3, rerank=SV)
    assert described == []
    assert by_path[0].path == by_id[0].path == "motorcycle-left.jpg"
    assert by_path[1].path == "motorcycle-right.jpg"  # a stereo pair: the same motorbike, verified


# -- computed on demand ----------------------------------------------------------------------------------


@pytest.fixture
def without_features(tmp_path: Path) -> Iterator[Collection]:
    collection = indexed(tmp_path, None)
    yield collection
    collection.close()


def test_features_are_computed_on_demand_and_stored_when_writable(
    without_features: Collection, query: Path, described: list[tuple[int, int]]
) -> None:
    assert without_features.info().local_features == {}
    first = without_features.search(query, k=5, rerank=SV)
    assert len(described) == 1 + 12  # the query, then each content once (two files share one)
    assert without_features.info().local_features == {
        IDENTITY: {
            "images": 12,
            "bytes": sum(len(d) for d in stored_features(without_features.path).values()),
        }
    }
    assert set(stored_features(without_features.path)) == content_hashes(without_features)
    described.clear()
    with Collection.open(without_features.path) as again:
        assert [hit.path for hit in again.search(query, k=5, rerank=SV)] == [hit.path for hit in first]
    assert len(described) == 1


def test_a_read_only_collection_keeps_computed_features_in_memory(
    without_features: Collection, query: Path, described: list[tuple[int, int]]
) -> None:
    with Collection.open(without_features.path, readonly=True) as reader:
        first = reader.search(query, k=5, rerank=SV)
        assert len(described) == 13
        assert first[0].path == "motorcycle-left.jpg"
        described.clear()
        assert [hit.path for hit in reader.search(query, k=5, rerank=SV)] == [hit.path for hit in first]
        assert len(described) == 1
        assert reader.info().local_features == {}
    assert stored_features(without_features.path) == {}


def test_a_file_changed_since_indexing_is_not_described(
    without_features: Collection, query: Path, described: list[tuple[int, int]]
) -> None:
    """Its pixels are no longer those of the content indexed: the candidate keeps its global score."""
    path = without_features.absolute_path("motorcycle-left.jpg")
    plain = {hit.path: hit.score for hit in without_features.search(query, k=13)}
    Image.new("RGB", (64, 64), (200, 10, 10)).save(path, "JPEG")
    hits = {hit.path: hit.score for hit in without_features.search(query, k=13, rerank=SV)}
    assert len(described) == 1 + 11
    assert hits["motorcycle-left.jpg"] == pytest.approx(plain["motorcycle-left.jpg"], abs=1e-6)


def test_damaged_stored_features_are_computed_again(
    with_features: Collection, query: Path, tmp_path: Path, described: list[tuple[int, int]]
) -> None:
    copy = tmp_path / "collection"
    shutil.copytree(with_features.path, copy)
    with Collection.open(copy) as collection:
        sha = sha_of(collection, "motorcycle-left.jpg")
        with store.transaction(collection.db):
            collection.db.execute("UPDATE local_features SET data = ? WHERE sha256 = ?", (b"junk", sha))
        hits = collection.search(query, k=3, rerank=SV)
        assert hits[0].path == "motorcycle-left.jpg"
        assert len(described) == 2  # the query and the damaged one
    LocalFeatures.from_bytes(stored_features(copy)[sha])  # stored again, readable


def test_features_of_other_bounds_are_kept_apart(
    with_features: Collection, query: Path, described: list[tuple[int, int]]
) -> None:
    """The stage's features (256 keypoints) are not the stored ones (512): computed, never mixed."""
    smaller = local_describer("sift", 256)
    hits = with_features.search(query, k=3, rerank=f"{SV},keypoints=256")
    assert hits[0].path == "motorcycle-left.jpg"
    assert len(described) == 1 + 12
    counts = with_features.info().local_features or {}
    assert counts[smaller.identity]["images"] == counts[IDENTITY]["images"] == 12
    with store.transaction(with_features.db):  # leave the module's collection as it was
        with_features.db.execute("DELETE FROM local_features WHERE identity = ?", (smaller.identity,))


# -- kept with their content -----------------------------------------------------------------------------


def test_the_next_index_completes_the_features_of_images_indexed_before(without_features: Collection) -> None:
    without_features.set_local_settings(SIFT)
    progress: list[SyncProgress] = []
    report = without_features.sync(progress=progress.append)
    assert (report.indexed, report.unchanged) == (0, 13)
    assert set(stored_features(without_features.path)) == content_hashes(without_features)
    assert [p.outcome for p in progress] == ["local features"] * 12
    assert [p.done for p in progress] == list(range(1, 13)) and {p.total for p in progress} == {12}
    assert without_features.sync().indexed == 0 and len(stored_features(without_features.path)) == 12


def test_removing_an_image_removes_its_features(tmp_path: Path) -> None:
    with indexed(tmp_path, SIFT) as collection:
        cat = sha_of(collection, "cat.jpg")
        assert collection.remove(["cat.jpg"]) == 1
        assert cat not in stored_features(collection.path)
        assert set(stored_features(collection.path)) == content_hashes(collection)
        collection.remove(["rocket again.jpg"])  # the content stays with rocket.jpg
        assert len(stored_features(collection.path)) == 11
        assert store.dangling_references(collection.db) == 0


def test_a_changed_file_gets_the_features_of_its_new_content(tmp_path: Path) -> None:
    with indexed(tmp_path, SIFT) as collection:
        path = collection.absolute_path("astronaut.jpg")
        old = sha_of(collection, "astronaut.jpg")
        edited(load_image(path)).save(path, quality=90)
        assert collection.sync().indexed == 1
        new = sha_of(collection, "astronaut.jpg")
        stored = stored_features(collection.path)
        assert old != new and old not in stored
        assert set(stored) == content_hashes(collection)
        expected = local_describer("sift").describe(load_image(path))
        assert LocalFeatures.from_bytes(stored[new]).to_bytes() == expected.to_bytes()


# -- a run killed while it stores features ---------------------------------------------------------------

FAMILY = 24


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("family") / "photos"
    photo_family(folder, FAMILY)
    return folder


def assert_every_content_has_valid_features(collection: Path) -> int:
    """Every committed content has stored features that read back; returns how many contents there are."""
    database = collection / "collection.sqlite"
    with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as db:
        contents = {sha for (sha,) in db.execute("SELECT sha256 FROM contents")}
        assert db.execute("PRAGMA foreign_key_check").fetchall() == []
    stored = stored_features(collection)
    assert set(stored) == contents
    for data in stored.values():
        assert len(LocalFeatures.from_bytes(data)) > 0
    return len(contents)


def resume(collection: Path, family: Path) -> None:
    with Collection.open_or_create(collection, SETTINGS, root=family) as resumed:
        assert resumed.local_settings == SIFT  # the killed run's `--local-features sift` was kept
        report = resumed.sync(commit_every=4)
        assert report.failed == []
    assert assert_every_content_has_valid_features(collection) == FAMILY


def test_a_run_killed_after_some_commits_leaves_valid_features_and_resumes(
    family: Path, tmp_path: Path
) -> None:
    collection = tmp_path / "collection"
    run = subprocess.Popen(
        index_command(family, collection, *INDEX_OPTIONS, "--commit-every", "4", "--local-features", "sift")
    )
    try:
        wait_for(lambda: committed_images(collection) >= 8 or run.poll() is not None, 120, "two commits")
        run.send_signal(signal.SIGKILL)
    finally:
        run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    survived = assert_every_content_has_valid_features(collection)
    assert 8 <= survived < FAMILY
    resume(collection, family)


KILL_INSIDE = textwrap.dedent(
    """
    import os, signal, sys
    from lookalike.collection import store
    from lookalike.cli.main import app

    original, calls = store.add_local_features, []

    def then_die(db, identity, items):
        original(db, identity, items)
        calls.append(1)
        if len(calls) == int(sys.argv[3]):
            os.kill(os.getpid(), signal.SIGKILL)  # features written, the commit not yet

    store.add_local_features = then_die
    app(["index", sys.argv[1], "--collection", sys.argv[2], *sys.argv[4:]], prog_name="lookalike")
    """
)


def test_a_kill_inside_a_commit_leaves_no_content_without_features(family: Path, tmp_path: Path) -> None:
    collection = tmp_path / "collection"
    options = (*INDEX_OPTIONS, "--commit-every", "4", "--local-features", "sift")
    # add_local_features is called once per new content: the 6th is in the second commit
    killed = subprocess.run(
        [sys.executable, "-c", KILL_INSIDE, str(family), str(collection), "6", *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert assert_every_content_has_valid_features(collection) == 4  # the first commit, whole
    assert committed_images(collection) == 4
    resume(collection, family)
