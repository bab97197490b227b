"""The collection's kNN table and index-time DBA (issue 14): the table and its incremental update against
naive loops, DBA from the table against the query-time formula, and collection searches with ``dba``,
``dba,aqe`` and ``diffusion`` against the same chains on a plain array of the collection's vectors — after
a first index, additions, removals, a changed file, a changed whitening, a table made stale behind the
collection's back, and a SIGKILL at each point of the upkeep."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import pytest

from lookalike.collection import Collection, SearchHit
from lookalike.collection import neighbours as knn
from lookalike.collection.ann import FlatIndex
from lookalike.collection.neighbours import Entries, KnnTable
from lookalike.errors import ConfigError
from lookalike.extract import DescriptorSettings, FileDescriptor
from lookalike.rerank import ArrayDatabase, database_side_augmentation, parse_chain
from lookalike.whitening import Whitening
from tests.conftest import require_weights, unit_rows

REPO = Path(__file__).resolve().parents[1]
RAW_DIM = 2048  # the descriptor dimension of the collection's (default) model
CHAINS = ("dba", "dba,aqe", "diffusion", "dba:n=3,alpha=1")
BASIS = '{"test": 1}'


# -- naive references ------------------------------------------------------------------------------------


def naive_table(ids: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Each vector's k nearest others by a loop over all pairs, in float64."""
    x = xb.astype(np.float64)
    neighbours = np.full((len(ids), k), -1, np.int64)
    similarities = np.full((len(ids), k), -np.inf)
    for i in range(len(ids)):
        others = sorted((j for j in range(len(ids)) if j != i), key=lambda j: -float(x[i] @ x[j]))[:k]
        for slot, j in enumerate(others):
            neighbours[i, slot], similarities[i, slot] = ids[j], x[i] @ x[j]
    return neighbours, similarities


def assert_table(table: KnnTable, ids: np.ndarray, xb: np.ndarray) -> None:
    neighbours, similarities = naive_table(ids, xb, table.k)
    np.testing.assert_array_equal(table.entries.ids, ids)
    np.testing.assert_array_equal(table.neighbours, neighbours)
    np.testing.assert_allclose(table.similarities, similarities, atol=1e-5)


def entries_of(ids: np.ndarray, rows: np.ndarray) -> Entries:
    order = np.argsort(ids)
    return Entries(ids[order], rows[order], rows[order] * 7 + 1)  # a crc per row


def clustered(count: int, dim: int, seed: int) -> np.ndarray:
    """Unit rows around 6 centres: neighbours that matter to DBA and diffusion, and no equal similarities."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(1000).standard_normal((6, dim))
    x = centres[rng.integers(0, 6, count)] + 0.9 * rng.standard_normal((count, dim))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# -- the table, its update and DBA from it ------------------------------------------------------------------


@pytest.mark.parametrize(("count", "k"), [(40, 7), (5, 7), (1, 3), (0, 4)])
def test_the_table_equals_a_naive_loop(count: int, k: int) -> None:
    xb, ids = unit_rows(count, 16, seed=1), np.arange(count, dtype=np.int64) * 3 + 10
    index = FlatIndex(16)
    index.add(xb, ids)
    assert_table(knn.build_table(index, entries_of(ids, np.arange(count)), xb, k, BASIS), ids, xb)


def test_the_incremental_update_equals_a_naive_recomputation() -> None:
    """Additions, removals, a changed descriptor (same id, new row) and all three at once, one step at a
    time; each an update (not a rebuild) equal to recomputing the whole table by a loop."""
    pool = unit_rows(200, 16, seed=2)
    vectors = dict(enumerate(pool[:60]))  # row → vector
    live = {i + 1: i for i in range(60)}  # id → row
    next_row, next_id = 60, 61

    def current() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        ids = np.array(sorted(live), np.int64)
        rows = np.array([live[i] for i in ids], np.int64)
        return ids, rows, np.stack([vectors[r] for r in rows])

    ids, rows, xb = current()
    index = FlatIndex(16)
    index.add(xb, ids)
    table = knn.build_table(index, entries_of(ids, rows), xb, 8, BASIS)
    rng = np.random.default_rng(3)
    for step in ["add 1", "add 5", "remove 1", "remove 4", "change 1", "add 3 remove 2 change 2", "add 12"]:
        words = step.split()
        for verb, amount in zip(words[::2], map(int, words[1::2]), strict=True):
            for _ in range(amount):
                if verb == "remove":
                    del live[int(rng.choice(sorted(live)))]
                    continue
                vectors[next_row] = pool[next_row]
                if verb == "add":
                    live[next_id], next_id = next_row, next_id + 1
                else:  # the file at this id now has another content
                    live[int(rng.choice(sorted(live)))] = next_row
                next_row += 1
        ids, rows, xb = current()
        index = FlatIndex(16)
        index.add(xb, ids)

        def vectors_at(positions: np.ndarray, xb: np.ndarray = xb) -> np.ndarray:
            return xb[positions]

        updated = knn.update_table(table, entries_of(ids, rows), index, vectors_at)
        assert updated is not None, f"{step}: a small change is an update"
        assert_table(updated, ids, xb)
        table = updated


def test_a_large_change_is_a_rebuild() -> None:
    xb = unit_rows(40, 8, seed=4)
    ids = np.arange(1, 41, dtype=np.int64)
    index = FlatIndex(8)
    index.add(xb[:20], ids[:20])
    table = knn.build_table(index, entries_of(ids[:20], np.arange(20)), xb[:20], 5, BASIS)
    index.add(xb[20:], ids[20:])
    assert knn.update_table(table, entries_of(ids, np.arange(40)), index, lambda p: xb[p]) is None


@pytest.mark.parametrize(("count", "n", "alpha"), [(50, 2, 3.0), (50, 5, 1.0), (50, 1, 0.0), (3, 4, 3.0)])
def test_dba_from_the_table_equals_the_query_time_formula(count: int, n: int, alpha: float) -> None:
    xb, ids = clustered(count, 32, seed=5), np.arange(count, dtype=np.int64) * 2 + 1
    index = FlatIndex(32)
    index.add(xb, ids)
    table = knn.build_table(index, entries_of(ids, np.arange(count)), xb, 10, BASIS)
    expected = database_side_augmentation(xb, n, alpha)
    np.testing.assert_allclose(knn.augment(table, xb, n, alpha), expected, atol=1e-6)


def test_saved_files_are_plain_arrays_and_a_damaged_one_is_not_used(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    xb, ids = unit_rows(30, 8, seed=6), np.arange(30, dtype=np.int64) + 1
    index = FlatIndex(8)
    index.add(xb, ids)
    table = knn.build_table(index, entries_of(ids, np.arange(30)), xb, 6, BASIS)
    path = tmp_path / "neighbours.npz"
    knn.save_table(path, table)
    loaded = knn.load_table(path)
    assert loaded is not None and loaded.basis == BASIS and loaded.entries.same(table.entries)
    np.testing.assert_array_equal(loaded.neighbours, table.neighbours)
    with np.load(path, allow_pickle=False) as data:
        assert all(data[name].dtype != object for name in data.files)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING):
        assert knn.load_table(path) is None
    assert "unreadable" in caplog.text
    assert knn.load_table(tmp_path / "absent.npz") is None


def test_options_are_checked() -> None:
    with pytest.raises(ConfigError):
        knn.Augmentation(0, 3.0)
    with pytest.raises(ConfigError):
        knn.Augmentation(2, -1.0)
    with pytest.raises(ConfigError):
        knn.neighbours_setting(0)
    assert knn.augmentation_setting(None) == {"dba": None}
    assert knn.Augmentation.from_record({"n": 2, "alpha": 3}) == knn.Augmentation(2, 3.0)


# -- collections -------------------------------------------------------------------------------------------


class VectorFiles:
    """A describer of files whose bytes are their descriptor (float32): the test chooses every vector and
    no network is built."""

    dim = RAW_DIM

    def describe_files(self, paths: Iterable[str | Path]) -> Iterator[FileDescriptor]:
        for position, path in enumerate(paths):
            data = Path(path).read_bytes()
            vector = np.frombuffer(data, "<f4").copy()
            yield FileDescriptor(position, Path(path), vector, (1, 1), None, hashlib.sha256(data).hexdigest())


def write_photos(folder: Path, start: int, vectors: np.ndarray) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for number, vector in enumerate(vectors, start):
        (folder / f"{number:05d}.png").write_bytes(vector.tobytes())


def opened(path: Path, readonly: bool = False) -> Collection:
    collection = Collection.open(path, readonly=readonly)
    collection._extractor = VectorFiles()  # type: ignore[assignment]
    return collection


def whitening(dim: int, seed: int = 0) -> Whitening:
    rng = np.random.default_rng(seed)
    return Whitening(rng.normal(0, 0.01, RAW_DIM), rng.normal(size=(dim, RAW_DIM)) / np.sqrt(RAW_DIM), "pca")


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    require_weights("resnet50.keras-imagenet")  # the collection records the default model's identity
    folder = tmp_path / "photos"
    write_photos(folder, 0, clustered(80, RAW_DIM, seed=7))
    return folder


def new_collection(tmp_path: Path, photos: Path) -> Collection:
    collection = Collection.create(tmp_path / "collection", DescriptorSettings(), root=photos)
    collection._extractor = VectorFiles()  # type: ignore[assignment]
    return collection


def assert_searches_equal_the_chains_on_an_array(collection: Collection, queries: int = 6) -> None:
    """``collection.search`` with each chain equals the chain on an ArrayDatabase of the collection's
    prepared vectors: by indexed image (its own id skipped) and by descriptor."""
    collection.refresh_settings()  # another writer may have changed the whitening
    ids, raw = collection.raw_vectors()
    xb = collection.prepare(raw)
    database = ArrayDatabase(xb, ids)
    picked = np.linspace(0, len(ids) - 1, queries).astype(int)
    for chain in CHAINS:
        expected = parse_chain(chain).search(database, xb[picked], 20, own=ids[picked])
        for row, position in enumerate(picked):
            hits = collection.search(int(ids[position]), k=20, rerank=chain)
            assert_same_ranking(hits, expected.ids[row], expected.scores[row], chain)
        expected = parse_chain(chain).search(database, collection.prepare(raw[picked[:2]]), 20)
        found = collection.search_vectors(raw[picked[:2]], k=20, rerank=chain)
        for row, hits in enumerate(found):
            assert_same_ranking(hits, expected.ids[row], expected.scores[row], chain)


def assert_same_ranking(hits: list[SearchHit], ids: np.ndarray, scores: np.ndarray, chain: str) -> None:
    """The same scores to 1e-5 and the same ids, allowing for ties: where two scores are within 1e-5 (the
    table's similarities come from faiss, the reference's from numpy, ~1e-7 apart), either order is right."""
    found = np.array([hit.id for hit in hits])
    np.testing.assert_allclose([hit.score for hit in hits], scores, atol=1e-5, err_msg=chain)
    for rank in np.flatnonzero(found != ids):
        tied = np.abs(scores - scores[rank]) <= 2e-5
        at_the_end = abs(scores[rank] - scores[-1]) <= 2e-5  # a tie at the cut: the other one is k + 1st
        assert found[rank] in ids[tied] or at_the_end, (
            f"{chain}: rank {rank}, {found.tolist()} ≠ {ids.tolist()}"
        )


def assert_stored_files_are_current(collection: Collection, n: int = 2, alpha: float = 3.0) -> None:
    """neighbours.npz and dba.npz describe the collection as it is, and equal a fresh computation."""
    ids, raw = collection.raw_vectors()
    xb = collection.prepare(raw)
    table = knn.load_table(collection.path / "neighbours.npz")
    assert table is not None and table.basis == collection.neighbours.basis()
    assert table.entries.same(collection.neighbours.entries())
    assert_table(table, ids, xb)
    found = knn.load_augmented(collection.path / "dba.npz")
    assert found is not None and found.entries.same(table.entries)
    assert found.setting == knn.Augmentation(n, alpha)
    np.testing.assert_allclose(found.vectors, database_side_augmentation(xb, n, alpha), atol=1e-5)


@pytest.mark.weights
@pytest.mark.parametrize("whitened", [None, 512], ids=["raw", "whitened-512"])
def test_searches_read_the_kept_table_and_equal_the_query_time_chains(
    tmp_path: Path, photos: Path, whitened: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    collection = new_collection(tmp_path, photos)
    if whitened:
        collection.set_whitening(whitening(whitened))
    collection.set_augmentation(2, 3.0)
    steps = {
        "first index": lambda: None,
        "images added": lambda: write_photos(photos, 80, clustered(6, RAW_DIM, seed=8)),
        "images removed": lambda: [(photos / f"{i:05d}.png").unlink() for i in (3, 40, 81)],
        "a file changed": lambda: write_photos(photos, 10, clustered(1, RAW_DIM, seed=9)),
    }
    augmented: list[tuple[int, float]] = []  # the DBA options searches augmented with

    def counted(table: KnnTable, xb: np.ndarray, n: int, alpha: float) -> np.ndarray:
        augmented.append((n, alpha))
        return augment(table, xb, n, alpha)

    augment = knn.augment
    for change in steps.values():
        change()
        collection.sync()
        assert_stored_files_are_current(collection)
        with monkeypatch.context() as patched:
            for name in ("build_table", "update_table"):
                patched.setattr(knn, name, refuse)
            patched.setattr(knn, "augment", counted)
            assert_searches_equal_the_chains_on_an_array(collection)
            with opened(collection.path, readonly=True) as reader:
                assert_searches_equal_the_chains_on_an_array(reader, queries=2)
    assert augmented and (2, 3.0) not in augmented  # only other options than the kept ones, from the table
    collection.remove([photos / "00020.png"])
    assert_stored_files_are_current(collection)
    collection.close()


def refuse(*args: object, **kwargs: object) -> None:
    raise AssertionError("a search made a kNN table the collection keeps")


@pytest.mark.weights
def test_a_stale_table_is_never_used(
    tmp_path: Path, photos: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    collection = new_collection(tmp_path, photos)
    collection.sync()  # keeps no table: the first search makes one, and saves it (writable)
    assert_searches_equal_the_chains_on_an_array(collection, queries=2)
    saved = tmp_path / "saved.npz"
    shutil.copy(collection.path / "neighbours.npz", saved)

    other = opened(collection.path)  # another writer changes the collection behind the first one's back
    write_photos(photos, 80, clustered(5, RAW_DIM, seed=10))
    (photos / "00007.png").unlink()
    other.sync()
    other.close()
    assert_searches_equal_the_chains_on_an_array(collection, queries=2)  # its table in memory is stale

    shutil.copy(saved, collection.path / "neighbours.npz")  # a stale file, as a kill could leave one
    with opened(collection.path, readonly=True) as reader, caplog.at_level(logging.INFO):
        assert_searches_equal_the_chains_on_an_array(reader, queries=2)
    assert "in memory" in caplog.text

    refitted = whitening(RAW_DIM // 4, seed=1)  # a new whitening of the same kind: every vector changes
    with opened(collection.path) as other:
        other.set_whitening(refitted)
    assert_searches_equal_the_chains_on_an_array(collection, queries=2)
    with pytest.raises(ConfigError):
        collection.knn_table(0)
    ids, neighbours, _ = collection.knn_table(70)  # more than the stored K: made again with 70
    assert neighbours.shape == (len(ids), 70)
    collection.close()


KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from lookalike import atomic
    from lookalike.collection import neighbours
    from tests.test_collection_neighbours import opened

    point, path = sys.argv[1:3]

    def die(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "before the table is saved":
        neighbours.save_table = die
    elif point == "table saved, augmented vectors not":
        neighbours.save_augmented = die
    elif point == "table written, not renamed":
        original = atomic.replace

        def replace(source, target):
            if Path(target).name == "neighbours.npz":
                die()
            return original(source, target)

        atomic.replace = replace
    with opened(Path(path)) as collection:
        collection.sync()
    """
)


@pytest.mark.weights
@pytest.mark.parametrize(
    "point", ["before the table is saved", "table written, not renamed", "table saved, augmented vectors not"]
)
def test_a_kill_during_the_upkeep_leaves_files_never_taken_for_current(
    tmp_path: Path, photos: Path, point: str
) -> None:
    with new_collection(tmp_path, photos) as collection:
        collection.set_augmentation(2, 3.0)
        collection.sync()
    write_photos(photos, 80, clustered(4, RAW_DIM, seed=11))
    for number in (5, 6):
        (photos / f"{number:05d}.png").unlink()
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, point, str(tmp_path / "collection")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    with opened(tmp_path / "collection", readonly=True) as reader:
        assert reader.info().images == 82  # the sync was committed; the upkeep after it was killed
        assert_searches_equal_the_chains_on_an_array(reader, queries=3)
    with opened(tmp_path / "collection") as collection:
        collection.sync()  # nothing to index: the upkeep brings the files up to date
        assert_stored_files_are_current(collection)
        assert_searches_equal_the_chains_on_an_array(collection, queries=3)


@pytest.mark.weights
def test_keeping_and_no_longer_keeping(tmp_path: Path, photos: Path) -> None:
    with new_collection(tmp_path, photos) as collection:
        collection.sync()
        assert not (collection.path / "neighbours.npz").exists()  # nothing asked for it yet
        collection.keep_neighbours(60)
        table = knn.load_table(collection.path / "neighbours.npz")
        assert table is not None and table.k == 60 and len(table.entries) == 80
        assert collection.settings["neighbours"] == {"k": 60}
        collection.set_augmentation(2, 3.0)
        assert collection.settings["dba"] == {"n": 2, "alpha": 3.0}
        assert_stored_files_are_current(collection)
        collection.set_augmentation(None)
        collection.keep_neighbours(None)
        write_photos(collection.root or photos, 80, clustered(2, RAW_DIM, seed=12))
        collection.sync()  # no longer kept: the files stay as they were, stale, and are not used as they are
        stale = knn.load_table(collection.path / "neighbours.npz")
        assert stale is not None and len(stale.entries) == 80
        assert_searches_equal_the_chains_on_an_array(collection, queries=2)
    reopened = Collection.open_or_create(tmp_path / "collection", rebuild=True)
    reopened.close()
    assert not (tmp_path / "collection" / "neighbours.npz").exists()
    assert not (tmp_path / "collection" / "dba.npz").exists()
