"""Collections through the library: indexing a folder, incremental sync, every kind of query, whitening,
export, removal, the on-disk schema version and the one-writer lock."""

from __future__ import annotations

import csv
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from lookalike.collection import Collection, SyncProgress, store
from lookalike.collection.export import CSV_COLUMNS, export_collection
from lookalike.collection.fitting import fit_collection_pca
from lookalike.errors import CollectionBusyError, CollectionError, ConfigError, SettingsMismatchError
from lookalike.extract import DescriptorSettings, Extractor, resolve_descriptor
from lookalike.images import load_image
from lookalike.whitening import Whitening
from tests.conftest import SAMPLE, require_weights
from tests.corpus import (
    SAMPLE_PHOTOS,
    copy_sample,
    encode,
    shared_resnet50_network,  # noqa: F401 (autouse fixture)
    variant,
)

SETTINGS = DescriptorSettings(imsize=128, precision="fp32")
NAMES = [p.name for p in SAMPLE_PHOTOS]

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def indexed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Collection]:
    """The sample photos, indexed once for the tests that only read."""
    photos = copy_sample(tmp_path_factory.mktemp("photos"))
    collection = Collection.create(tmp_path_factory.mktemp("collection"), SETTINGS, root=photos)
    collection.sync()
    yield collection
    collection.close()


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[Collection]:
    """The sample photos, indexed for a test that changes them or the collection."""
    photos = copy_sample(tmp_path / "photos")
    collection = Collection.create(tmp_path / "collection", SETTINGS, root=photos)
    collection.sync()
    yield collection
    collection.close()


@dataclass
class Work:
    """What the library did to images: files decoded, files hashed, network forward passes."""

    decoded: list[Path] = field(default_factory=list)
    hashed: list[Path] = field(default_factory=list)
    forward: int = 0


@pytest.fixture
def work(monkeypatch: pytest.MonkeyPatch) -> Work:
    import lookalike.collection.sync as sync_module
    import lookalike.extract as extract_module

    seen = Work()
    decode, hash_file, forward = load_image, sync_module.sha256_file, Extractor.describe_tensors
    decode_bytes = extract_module.load_image_bytes

    def spy_decode(path: Path, *args: object, **kwargs: object) -> object:
        seen.decoded.append(Path(path))
        return decode(path, *args, **kwargs)

    def spy_decode_bytes(data: bytes, name: str, *args: object, **kwargs: object) -> object:
        seen.decoded.append(Path(name))
        return decode_bytes(data, name, *args, **kwargs)

    def spy_hash(path: Path) -> str:
        seen.hashed.append(Path(path))
        return hash_file(path)

    def spy_forward(self: Extractor, batch: object) -> np.ndarray:
        seen.forward += 1
        return forward(self, batch)

    monkeypatch.setattr(extract_module, "load_image_bytes", spy_decode_bytes)
    monkeypatch.setattr("lookalike.collection.query.load_image", spy_decode)
    monkeypatch.setattr(sync_module, "sha256_file", spy_hash)
    monkeypatch.setattr(Extractor, "describe_tensors", spy_forward)
    return seen


def scores_by_path(collection: Collection, query: object, k: int = 100) -> dict[str, float]:
    return {hit.path: hit.score for hit in collection.search(query, k=k)}


def random_whitening(dim: int, seed: int = 0) -> Whitening:
    """A whitening the collection cannot tell from a fitted one, without a 2048-D eigendecomposition."""
    rng = np.random.default_rng(seed)
    return Whitening(rng.normal(0, 0.01, 2048), rng.normal(size=(dim, 2048)) / np.sqrt(2048), "pca")


def set_mtime(path: Path, seconds_later: int) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + seconds_later * 10**9))


# -- indexing and searching ------------------------------------------------------------------------------


def test_sync_indexes_every_photo_and_each_finds_itself_first(indexed: Collection) -> None:
    info = indexed.info()
    assert (info.images, info.failed, info.distinct_contents) == (len(NAMES), 0, len(NAMES))
    assert sorted(indexed.images()) == sorted(NAMES)
    for name in NAMES:
        hits = indexed.search(indexed.root / name, k=3)
        assert hits[0].path == name
        assert hits[0].score == pytest.approx(1.0, abs=1e-5)
        assert hits[1].score < 0.99


def test_sync_report_and_progress_of_a_first_run(tmp_path: Path) -> None:
    photos = copy_sample(tmp_path / "photos")
    events: list[SyncProgress] = []
    with Collection.create(tmp_path / "c", SETTINGS) as collection:
        report = collection.sync(photos, progress=events.append, commit_every=3)
        assert collection.root == photos.resolve()
    assert (report.indexed, report.reused, report.unchanged, report.removed) == (len(NAMES), 0, 0, 0)
    assert report.failed == []
    assert report.seconds > 0 and report.images_per_second > 0
    assert [e.done for e in events] == list(range(1, len(NAMES) + 1))
    assert {e.total for e in events} == {len(NAMES)}
    assert sorted(e.name for e in events) == sorted(NAMES)
    assert {e.outcome for e in events} == {"ok"}


@pytest.mark.parametrize(
    ("query", "neighbour"),
    [
        ("cat.jpg", "cat-crop-flip.jpg"),
        ("coffee.jpg", "coffee-rotated-dark.jpg"),
        ("motorcycle-left.jpg", "motorcycle-right.jpg"),
    ],
)
def test_the_next_neighbour_is_the_same_scene(indexed: Collection, query: str, neighbour: str) -> None:
    hits = indexed.search(query, k=3)
    assert [hit.path for hit in hits[:2]] == [query, neighbour]
    assert hits[1].score > hits[2].score + 0.2


def test_queries_by_image_path_id_and_vector_agree(indexed: Collection, tmp_path: Path, work: Work) -> None:
    record = indexed.record("cat.jpg")
    assert record is not None
    path = indexed.root / "cat.jpg"
    outside = shutil.copy(path, tmp_path / "not indexed.jpg")
    queries = {
        "image": load_image(path),
        "indexed path": path,
        "indexed name": "cat.jpg",
        "other file": outside,
        "id": record.id,
        "numpy id": np.int64(record.id),
        "vector": indexed.vector(record.id),
    }
    results = {kind: indexed.search(query, k=5) for kind, query in queries.items()}
    reference = results["id"]
    assert reference[0].id == record.id
    for kind, hits in results.items():
        assert [h.id for h in hits] == [h.id for h in reference], kind
        np.testing.assert_allclose([h.score for h in hits], [h.score for h in reference], atol=1e-4)
    # The indexed file and its id reuse the stored descriptor; the image and the other file are described.
    assert work.decoded == [Path(outside)]
    assert work.forward == 2


def test_k_larger_than_the_collection_gives_every_image_once(indexed: Collection) -> None:
    hits = indexed.search("rocket.jpg", k=100)
    assert [h.rank for h in hits] == list(range(1, len(NAMES) + 1))
    assert sorted(h.path for h in hits) == sorted(NAMES)
    scores = [h.score for h in hits]
    assert scores == sorted(scores, reverse=True)
    with pytest.raises(CollectionError, match="k must be"):
        indexed.search("rocket.jpg", k=0)


def test_search_files_finds_each_file_and_reports_unreadable_ones(
    indexed: Collection, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff\xe0 not really")
    paths = [indexed.root / "hubble.jpg", broken, indexed.root / "cells.jpg"]
    results = indexed.search_files(paths, k=2)
    assert [r.hits[0].path if r.hits else None for r in results] == ["hubble.jpg", None, "cells.jpg"]
    assert [r.path for r in results] == paths
    assert results[0].hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert results[0].error is None and "header" in (results[1].error or "")


def test_search_vectors_answers_each_row(indexed: Collection) -> None:
    ids, raw = indexed.raw_vectors()
    results = indexed.search_vectors(raw[:4], k=1)
    assert [r[0].id for r in results] == [int(i) for i in ids[:4]]
    with pytest.raises(CollectionError, match="dimension"):
        indexed.search(np.ones(7, np.float32))


def test_query_expansion_equals_expanding_over_every_stored_descriptor(indexed: Collection) -> None:
    from lookalike.rerank import alpha_query_expansion

    ids, raw = indexed.raw_vectors()
    database = indexed.prepare(raw)
    query = indexed.extractor.describe(load_image(SAMPLE / "cat-crop-flip.jpg").rotate(8))
    expanded = alpha_query_expansion(indexed.prepare(query[None]), database)[0]
    expected = np.argsort(-(database @ expanded), kind="stable")[:5]
    hits = indexed.search(query, k=5, rerank="aqe")
    assert [h.id for h in hits] == [int(ids[i]) for i in expected]
    assert [h.score for h in hits] == pytest.approx(list((database @ expanded)[expected]), abs=1e-5)
    assert [h.score for h in hits] != pytest.approx([h.score for h in indexed.search(query, k=5)], abs=1e-4)
    folder_hits = indexed.search_vectors(query[None], k=5, rerank="aqe")[0]
    assert [h.id for h in folder_hits] == [h.id for h in hits]
    with pytest.raises(ConfigError, match="unknown re-ranker 'magic'"):
        indexed.search(query, rerank="magic")


def test_an_indexed_query_never_expands_with_itself(indexed: Collection) -> None:
    """By id, by unchanged file, or as one of a folder of query files: the query's own entry is skipped,
    as in evaluation (lookalike.rerank's convention)."""
    from lookalike.rerank import alpha_query_expansion

    ids, raw = indexed.raw_vectors()
    database = indexed.prepare(raw)
    cat = indexed.record("cat.jpg")
    row = int(np.flatnonzero(ids == cat.id)[0])
    expanded = alpha_query_expansion(database[row][None], database, exclude=np.array([row]))[0]
    expected = np.argsort(-(database @ expanded), kind="stable")[:4]
    by_id = indexed.search(cat.id, k=4, rerank="aqe")
    assert [h.id for h in by_id] == [int(ids[i]) for i in expected]
    assert [h.score for h in by_id] == pytest.approx(list((database @ expanded)[expected]), abs=1e-5)
    by_file = indexed.search(indexed.root / "cat.jpg", k=4, rerank="aqe")
    assert [h.id for h in by_file] == [h.id for h in by_id]
    [in_folder] = indexed.search_files([indexed.root / "cat.jpg"], k=4, rerank="aqe")
    assert [h.id for h in in_folder.hits] == [h.id for h in by_id]
    # a bare descriptor has no identity: its indexed copy is a neighbour like any other
    counted = alpha_query_expansion(database[row][None], database)[0]
    as_vector = indexed.search_vectors(raw[row][None], k=4, rerank="aqe")[0]
    assert [h.score for h in as_vector] == pytest.approx(
        list(np.sort(database @ counted)[::-1][:4]), abs=1e-5
    )


def test_dba_then_aqe_over_the_collection_equals_the_formula(indexed: Collection) -> None:
    from lookalike.rerank import alpha_query_expansion, database_side_augmentation, parse_chain

    ids, raw = indexed.raw_vectors()
    augmented = database_side_augmentation(indexed.prepare(raw), n=3)
    query = indexed.extractor.describe(load_image(SAMPLE / "cat-crop-flip.jpg").rotate(8))
    expanded = alpha_query_expansion(indexed.prepare(query[None]), augmented)[0]
    expected = np.argsort(-(augmented @ expanded), kind="stable")[:5]
    for chain in ("dba:n=3,aqe", parse_chain("dba:n=3+aqe")):
        hits = indexed.search(query, k=5, rerank=chain)
        assert [h.id for h in hits] == [int(ids[i]) for i in expected]
        assert [h.score for h in hits] == pytest.approx(list((augmented @ expanded)[expected]), abs=1e-5)


def test_a_bbox_crops_an_image_query(indexed: Collection) -> None:
    record = indexed.record("cat.jpg")
    width, height = record.width, record.height
    assert (width, height) == (384, 255)
    whole = indexed.search(record.id, k=3, bbox=(0, 0, width, height))
    assert whole[0].path == "cat.jpg" and whole[0].score == pytest.approx(1.0, abs=1e-4)
    half = indexed.search(record.id, k=3, bbox=(0, 0, width / 2, height))
    assert half[0].score < 0.99
    assert {h.path for h in half[:2]} == {"cat.jpg", "cat-crop-flip.jpg"}
    by_path = indexed.search("cat.jpg", k=3, bbox=(0, 0, width / 2, height))
    assert [h.score for h in by_path] == pytest.approx([h.score for h in half], abs=1e-5)
    with pytest.raises(CollectionError, match="bbox"):
        indexed.search(indexed.vector(record.id), bbox=(0, 0, 10, 10))


def test_an_empty_collection_finds_nothing(tmp_path: Path, chelsea: object) -> None:
    with Collection.create(tmp_path / "empty", SETTINGS) as collection:
        assert collection.search(chelsea) == []
        assert collection.search_vectors(np.ones((2, collection.dim), np.float32)) == [[], []]
        ids, raw = collection.raw_vectors()
        assert ids.shape == (0,) and raw.shape == (0, collection.dim)
        assert collection.info().images == 0


# -- incremental sync ------------------------------------------------------------------------------------


def test_an_unchanged_folder_is_neither_hashed_nor_decoded(fresh: Collection, work: Work) -> None:
    before = fresh.images()
    report = fresh.sync()
    assert (report.indexed, report.reused, report.unchanged, report.removed) == (0, 0, len(NAMES), 0)
    assert report.failed == []
    assert work.decoded == [] and work.hashed == [] and work.forward == 0
    assert fresh.images() == before


def test_only_a_new_file_is_described(fresh: Collection, work: Work) -> None:
    new = fresh.root / "new" / "rocket-flip.jpg"
    new.parent.mkdir()
    new.write_bytes(encode(variant(SAMPLE / "rocket.jpg", "flip"), "JPEG", quality=90))
    report = fresh.sync()
    assert (report.indexed, report.unchanged) == (1, len(NAMES))
    assert work.decoded == [new] and work.hashed == [new]
    hits = fresh.search("new/rocket-flip.jpg", k=2)
    assert [h.path for h in hits] == ["new/rocket-flip.jpg", "rocket.jpg"]


def test_a_modified_file_keeps_its_id_and_gets_a_new_descriptor(fresh: Collection, work: Work) -> None:
    path = fresh.root / "rocket.jpg"
    old = fresh.record("rocket.jpg")
    old_vector = fresh.vector(old.id)
    path.write_bytes(encode(variant(SAMPLE / "cat.jpg", "crop"), "JPEG", quality=90))
    set_mtime(path, 5)
    report = fresh.sync()
    assert (report.indexed, report.unchanged) == (1, len(NAMES) - 1)
    assert work.decoded == [path]
    new = fresh.record("rocket.jpg")
    assert new.id == old.id and new.sha256 != old.sha256 and new.row != old.row
    new_vector = fresh.vector(new.id)
    assert float(new_vector @ old_vector) < 0.9
    np.testing.assert_allclose(new_vector, fresh.extractor.describe(load_image(path)), atol=1e-5)
    hits = fresh.search("rocket.jpg", k=3)  # now a cat
    assert hits[0].path == "rocket.jpg"
    assert {h.path for h in hits[1:]} == {"cat.jpg", "cat-crop-flip.jpg"}
    assert fresh.info().distinct_contents == len(NAMES)


def test_a_touched_file_is_rehashed_but_not_decoded(fresh: Collection, work: Work) -> None:
    path = fresh.root / "hubble.jpg"
    old = fresh.record("hubble.jpg")
    set_mtime(path, 7)
    report = fresh.sync()
    assert (report.indexed, report.reused, report.unchanged) == (0, 1, len(NAMES) - 1)
    assert work.hashed == [path]
    assert work.decoded == [] and work.forward == 0
    new = fresh.record("hubble.jpg")
    assert (new.id, new.row, new.sha256) == (old.id, old.row, old.sha256)
    assert new.mtime_ns == path.stat().st_mtime_ns != old.mtime_ns
    assert (new.width, new.height) == (old.width, old.height) == (384, 335)
    assert fresh.sync().unchanged == len(NAMES)


def test_a_deleted_file_is_forgotten(fresh: Collection) -> None:
    (fresh.root / "cells.jpg").unlink()
    report = fresh.sync()
    assert (report.removed, report.unchanged) == (1, len(NAMES) - 1)
    assert fresh.record("cells.jpg") is None
    assert "cells.jpg" not in scores_by_path(fresh, "hubble.jpg")
    info = fresh.info()
    assert (info.images, info.distinct_contents) == (len(NAMES) - 1, len(NAMES) - 1)
    ids, _ = fresh.raw_vectors()
    assert len(ids) == len(NAMES) - 1


def test_identical_files_are_described_and_stored_once(fresh: Collection, work: Work) -> None:
    twins = [fresh.root / "twins" / "a.jpg", fresh.root / "twins" / "b copy.jpg"]
    twins[0].parent.mkdir()
    data = encode(variant(SAMPLE / "astronaut.jpg", "crop-flip"), "JPEG", quality=90)
    for twin in twins:
        twin.write_bytes(data)
    copy_of_cat = fresh.root / "twins" / "cat again.jpg"
    shutil.copy(fresh.root / "cat.jpg", copy_of_cat)
    report = fresh.sync()
    assert (report.indexed, report.reused) == (1, 2)
    assert work.decoded == [twins[0]]
    info = fresh.info()
    assert (info.images, info.distinct_contents) == (len(NAMES) + 3, len(NAMES) + 1)
    a, b = fresh.record("twins/a.jpg"), fresh.record("twins/b copy.jpg")
    assert a.id != b.id and a.row == b.row
    assert fresh.record("twins/cat again.jpg").row == fresh.record("cat.jpg").row
    top = fresh.search("twins/a.jpg", k=3)
    assert {h.path for h in top[:2]} == {"twins/a.jpg", "twins/b copy.jpg"}
    assert top[1].score == pytest.approx(1.0, abs=1e-5)
    assert {h.path for h in fresh.search("cat.jpg", k=2)} == {"cat.jpg", "twins/cat again.jpg"}


def test_add_indexes_files_outside_the_root_by_absolute_path(fresh: Collection, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere" / "coffee-flip.jpg"
    outside.parent.mkdir()
    outside.write_bytes(encode(variant(SAMPLE / "coffee.jpg", "flip"), "JPEG", quality=90))
    report = fresh.add([outside])
    assert report.indexed == 1
    assert fresh.record(outside).path == str(outside)
    assert fresh.search(outside, k=1)[0].path == str(outside)
    assert fresh.add([outside]).unchanged == 1
    assert fresh.sync().removed == 0  # sync forgets only files under the folder it walks


def test_remove_forgets_by_indexed_or_absolute_path(fresh: Collection) -> None:
    removed = fresh.remove(["cat.jpg", fresh.root / "coffee.jpg", "no-such-file.jpg"])
    assert removed == 2
    assert fresh.record("cat.jpg") is None and fresh.record("coffee.jpg") is None
    paths = scores_by_path(fresh, "cat-crop-flip.jpg")
    assert "cat.jpg" not in paths and "coffee.jpg" not in paths and len(paths) == len(NAMES) - 2
    assert fresh.info().distinct_contents == len(NAMES) - 2
    assert fresh.sync().indexed == 2  # the files are still there: the next sync brings them back


# -- settings --------------------------------------------------------------------------------------------


def test_other_settings_are_refused_until_rebuild(fresh: Collection) -> None:
    path, root = fresh.path, fresh.root
    fresh.close()
    other = DescriptorSettings(imsize=160, precision="fp32")
    with pytest.raises(SettingsMismatchError) as caught:
        Collection.open_or_create(path, other)
    assert "--rebuild" in str(caught.value) and "imsize: 128 ≠ 160" in str(caught.value)
    with Collection.open_or_create(path, SETTINGS) as same:
        assert same.info().images == len(NAMES)
    with Collection.open_or_create(path, other, rebuild=True) as rebuilt:
        assert rebuilt.info().images == 0
        assert rebuilt.settings["imsize"] == 160
        assert not (path / "vectors.f32").exists()
        assert rebuilt.sync(root).indexed == len(NAMES)


def test_a_mismatched_model_is_refused_before_any_weights_load(
    fresh: Collection, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_weights("efficientnet-lite0.imagenet")
    path = fresh.path
    fresh.close()

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("weights were loaded")

    monkeypatch.setattr("lookalike.network.load_weights", no_loading)
    other = DescriptorSettings(model="efficientnet-lite0.imagenet", imsize=128)
    with pytest.raises(SettingsMismatchError, match=r"model: 'resnet50\.keras-imagenet' ≠ 'efficientnet"):
        Collection.open_or_create(path, other)


def test_resolving_settings_agrees_with_the_built_network() -> None:
    for model in ("resnet50.keras-imagenet", "efficientnet-lite0.imagenet"):
        require_weights(model)
        for pooling, gem_p in (("gem", None), ("gem", 2.7), ("rmac", None), ("mac", None)):
            settings = DescriptorSettings(
                model=model, pooling=pooling, gem_p=gem_p, imsize=64, scales=(1, 0.5)
            )
            resolved, built = resolve_descriptor(settings), Extractor(settings)
            assert (resolved.dim, resolved.scale_power) == (built.dim, built.scale_power)
            assert resolved.weights_sha256 == built.resolved.weights_sha256


def test_settings_and_schema_version_are_recorded(indexed: Collection) -> None:
    with sqlite3.connect(indexed.path / "collection.sqlite") as db:
        assert db.execute("PRAGMA user_version").fetchone()[0] == store.SCHEMA_VERSION
    info = indexed.info()
    assert info.schema_version == store.SCHEMA_VERSION
    assert info.settings["model"] == "resnet50.keras-imagenet"
    assert (info.settings["imsize"], info.settings["pooling"], info.settings["dim"]) == (128, "rmac", 2048)
    assert len(info.settings["weights_sha256"]) == 64
    assert info.root == str(indexed.root)
    assert info.disk_bytes >= (indexed.path / "vectors.f32").stat().st_size == len(NAMES) * 2048 * 4


def test_a_newer_schema_is_refused(fresh: Collection) -> None:
    path = fresh.path
    fresh.close()
    with sqlite3.connect(path / "collection.sqlite") as db:
        db.execute(f"PRAGMA user_version = {store.SCHEMA_VERSION + 1}")
    for readonly in (False, True):
        with pytest.raises(CollectionError, match="newer than this lookalike"):
            Collection.open(path, readonly=readonly)


def test_not_a_collection_and_already_a_collection(tmp_path: Path, indexed: Collection) -> None:
    with pytest.raises(CollectionError, match="not a lookalike collection"):
        Collection.open(tmp_path)
    with pytest.raises(CollectionError, match="already holds a collection"):
        Collection.create(indexed.path, SETTINGS)


def test_read_only_opening_takes_the_path_literally(tmp_path: Path) -> None:
    odd = tmp_path / "c #1 ?été%20"
    photos = copy_sample(tmp_path / "photos")
    with Collection.create(odd, SETTINGS, root=photos) as collection:
        collection.sync()
    before = sorted(p.name for p in tmp_path.iterdir())
    with Collection.open(odd, readonly=True) as reader:
        assert reader.info().images == len(NAMES)
        assert reader.search("cat.jpg", k=1)[0].path == "cat.jpg"
    assert sorted(p.name for p in tmp_path.iterdir()) == before


# -- whitening -------------------------------------------------------------------------------------------


def test_whitening_changes_scores_without_extraction_and_comes_off_exactly(
    fresh: Collection, work: Work
) -> None:
    raw_scores = scores_by_path(fresh, "cat.jpg")
    whitening = fit_collection_pca(fresh)
    assert whitening.dim == len(NAMES) - 1
    fresh.set_whitening(whitening)
    whitened = scores_by_path(fresh, "cat.jpg")
    assert work.decoded == [] and work.forward == 0
    assert whitened["cat.jpg"] == pytest.approx(1.0, abs=1e-5)
    assert max(abs(whitened[p] - raw_scores[p]) for p in NAMES) > 0.05
    assert fresh.info().whitening == "pca"
    with Collection.open(fresh.path, readonly=True) as reopened:
        assert reopened.whitening is not None and reopened.whitening.dim == whitening.dim
        again = scores_by_path(reopened, "cat.jpg")
        assert again.keys() == whitened.keys()
        assert [again[p] for p in NAMES] == pytest.approx([whitened[p] for p in NAMES], abs=1e-6)
    fresh.set_whitening(None)
    assert scores_by_path(fresh, "cat.jpg") == raw_scores
    assert fresh.info().whitening is None
    with pytest.raises(CollectionError, match="expects"):
        fresh.set_whitening(Whitening(np.zeros(8, np.float32), np.eye(8, dtype=np.float32), "pca"))


def test_a_reader_follows_a_whitening_refitted_by_another_writer(fresh: Collection) -> None:
    fresh.set_whitening(random_whitening(64, seed=1))
    with Collection.open(fresh.path, readonly=True) as reader:
        assert reader.search("cat.jpg", k=1)[0].path == "cat.jpg"
        assert reader.whitening.dim == 64
        fresh.set_whitening(random_whitening(32, seed=2))
        fresh.index()  # the writer saves the new index; the reader loads it from disk
        assert reader.whitening.dim == 32
        expected = scores_by_path(fresh, "hubble.jpg")
        assert scores_by_path(reader, "hubble.jpg") == pytest.approx(expected, abs=1e-6)


# -- export ----------------------------------------------------------------------------------------------


def test_export_rows_match_the_raw_vectors_and_the_csv(indexed: Collection, tmp_path: Path) -> None:
    written = export_collection(indexed, tmp_path / "out")
    ids, raw = indexed.raw_vectors()
    descriptors = np.load(written["descriptors"], allow_pickle=False)
    assert descriptors.dtype == np.float32 and descriptors.shape == (len(NAMES), 2048)
    np.testing.assert_array_equal(descriptors, raw)
    with open(written["images"], newline="", encoding="utf-8") as handle:
        lines = list(csv.reader(handle))
    assert tuple(lines[0]) == CSV_COLUMNS
    rows = [dict(zip(CSV_COLUMNS, line, strict=True)) for line in lines[1:]]
    assert [int(r["index"]) for r in rows] == list(range(len(NAMES)))
    assert [int(r["id"]) for r in rows] == [int(i) for i in ids]
    records = indexed.records([int(i) for i in ids])
    for row, vector in zip(rows, descriptors, strict=True):
        record = records[int(row["id"])]
        assert row["path"] == record.path and row["sha256"] == record.sha256
        assert (int(row["width"]), int(row["height"])) == (record.width, record.height)
        np.testing.assert_array_equal(vector, indexed.vector(record.id))
    assert "descriptors_whitened" not in written


def test_export_with_whitening_adds_the_whitened_rows(fresh: Collection, tmp_path: Path) -> None:
    fresh.set_whitening(random_whitening(16))
    written = export_collection(fresh, tmp_path / "out")
    _, raw = fresh.raw_vectors()
    whitened = np.load(written["descriptors_whitened"], allow_pickle=False)
    np.testing.assert_allclose(whitened, fresh.whitening.apply(raw), atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(whitened, axis=1), 1.0, atol=1e-5)


# -- the write lock --------------------------------------------------------------------------------------


def test_a_second_writer_in_this_process_is_busy(fresh: Collection) -> None:
    with Collection.open(fresh.path) as second, fresh.writing():
        with pytest.raises(CollectionBusyError):
            second.remove(["cat.jpg"])
        with pytest.raises(CollectionBusyError):
            Collection.open_or_create(fresh.path, SETTINGS, rebuild=True)
        assert fresh.remove(["cat.jpg"]) == 1  # the holder itself may write (re-entrant)
    with Collection.open(fresh.path) as second:
        assert second.remove(["coffee.jpg"]) == 1
    with (
        Collection.open(fresh.path, readonly=True) as reader,
        pytest.raises(CollectionError, match="read-only"),
    ):
        reader.remove(["hubble.jpg"])


HOLD_LOCK = textwrap.dedent(
    """
    import sys
    from lookalike.collection import Collection

    with Collection.open(sys.argv[1]) as collection, collection.writing():
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


def test_a_second_writer_in_another_process_is_busy(fresh: Collection) -> None:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(fresh.path)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(CollectionBusyError, match="another process"):
            fresh.sync()
        with pytest.raises(CollectionBusyError):
            fresh.set_whitening(None)
        assert fresh.search("cat.jpg", k=1)[0].path == "cat.jpg"  # reading is never blocked
    finally:
        holder.communicate("\n", timeout=60)
    assert holder.returncode == 0
    assert fresh.sync().unchanged == len(NAMES)
