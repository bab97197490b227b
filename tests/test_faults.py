"""Fault injection: what careless users, full disks, odd files and damaged collection files do to lookalike.

Every fault ends in one of two ways: a clear typed error (and the collection stays usable or says how to
repair it), or a transparent repair. Never wrong results, a hang or a traceback.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from lookalike.cli.main import app
from lookalike.collection import Collection, store
from lookalike.collection.check import check_collection
from lookalike.collection.collection import INDEX, INDEX_META, VECTORS
from lookalike.errors import CollectionError, DamagedCollectionError, ImageError, LookalikeError
from lookalike.extract import DescriptorSettings
from tests.corpus import (
    SAMPLE_PHOTOS,
    copy_sample,
    shared_resnet50_network,  # noqa: F401 (autouse fixture)
)

SETTINGS = DescriptorSettings(imsize=96)  # precision auto, as a repair re-extracts with
NAMES = sorted(p.name for p in SAMPLE_PHOTOS)

pytestmark = pytest.mark.weights


@pytest.fixture(scope="module")
def pristine(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(photos, collection) indexed once; tests damage copies of it."""
    photos = copy_sample(tmp_path_factory.mktemp("faults") / "photos")
    path = photos.parent / "collection"
    with Collection.create(path, SETTINGS, root=photos) as collection:
        collection.sync()
    return photos, path


@pytest.fixture
def damaged(pristine: tuple[Path, Path], tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the pristine collection (same root: the photos are only read) to damage."""
    photos, path = pristine
    copy = tmp_path / "collection"
    shutil.copytree(path, copy)
    return photos, copy


class Results(dict):
    """Every image's top-3 (path, score) by id; equal when paths agree and scores to 2e-3 (a descriptor
    extracted again in another batch moves by about 1e-4)."""

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, dict) or sorted(self) != sorted(other):
            return False
        return all(
            [p for p, _ in self[name]] == [p for p, _ in other[name]]
            and np.allclose([s for _, s in self[name]], [s for _, s in other[name]], atol=2e-3)
            for name in self
        )

    __hash__ = None  # type: ignore[assignment]


def baseline(path: Path) -> Results:
    with Collection.open(path, readonly=True) as collection:
        return Results(
            {name: [(h.path, h.score) for h in collection.search(record.id, k=3)]
             for name, record in collection.images().items()}
        )  # fmt: skip


def run(*args: str) -> tuple[int, str]:
    """The CLI in-process: exit code and all it printed. An escaped exception is a failure (a traceback)."""
    result = CliRunner().invoke(app, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.output


def finishes(call: Callable[[], object], fifo: Path | None = None, seconds: float = 20.0) -> object:
    """Run ``call`` in a thread; fail (after unblocking a FIFO reader, so the test ends) if it hangs."""
    outcome: dict[str, object] = {}

    def target() -> None:
        try:
            outcome["value"] = call()
        except BaseException as exc:
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        if fifo is not None:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        pytest.fail(f"{call} hung on a FIFO")
    if "error" in outcome:
        raise outcome["error"]  # type: ignore[misc]
    return outcome.get("value")


# -- 1. one file, one name ---------------------------------------------------------------------------------


def test_the_same_folder_by_other_spellings_is_stored_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    photos = copy_sample(tmp_path / "d")
    (tmp_path / "sub").mkdir()
    (tmp_path / "dlink").symlink_to(photos, target_is_directory=True)
    with Collection.create(tmp_path / "col", SETTINGS, root=photos) as collection:
        collection.sync()
    monkeypatch.chdir(tmp_path / "sub")
    for spelling in ("../d", "../dlink", "../sub/../d", str(tmp_path / "dlink")):
        with Collection.open("../col") as collection:
            report = collection.sync(Path(spelling))
            assert (report.indexed, report.reused, report.removed) == (0, 0, 0), spelling
            assert sorted(collection.images()) == NAMES
            hits = collection.search(Path(spelling) / "cat.jpg", k=len(NAMES))
            assert len({h.path for h in hits}) == len(hits) == len(NAMES)
            assert collection.record(Path(spelling) / "cat.jpg") is not None


def test_names_left_by_the_old_spelling_bug_are_cleaned_up(tmp_path: Path) -> None:
    photos = copy_sample(tmp_path / "d")
    with Collection.create(tmp_path / "col", SETTINGS, root=photos) as collection:
        collection.sync()
        with store.transaction(collection.db):  # what the bug stored: a second name for cat.jpg
            record = collection.record("cat.jpg")
            assert record is not None
            collection.db.execute(
                "INSERT INTO images(path, size, mtime_ns, sha256, status, row) VALUES (?, ?, ?, ?, 'ok', ?)",
                ("../d/cat.jpg", record.size, record.mtime_ns, record.sha256, record.row),
            )
        collection.sync()
        assert sorted(collection.images()) == NAMES


# -- 3. a truncated descriptor file ------------------------------------------------------------------------


def test_a_truncated_vector_file_is_refused_then_repaired(damaged: tuple[Path, Path]) -> None:
    photos, path = damaged
    before = baseline(path)
    os.truncate(path / VECTORS, 10_000)  # 10,000 bytes: one whole row of 2,048 floats and a bit
    with pytest.raises(DamagedCollectionError, match=r"check -c .* --repair"):
        Collection.open(path)
    code, output = run("remove", "cat.jpg", "-c", str(path))
    assert code == 1 and "truncated" in output
    code, output = run("index", str(photos), "-c", str(path))
    assert code == 1 and "--repair" in output
    report = check_collection(path)
    assert report.damaged and {f.part for f in report.findings} >= {"vectors"}
    repaired = check_collection(path, repair=True)
    assert not repaired.damaged, repaired.findings
    assert baseline(path) == before
    assert not check_collection(path).findings


# -- 4. a file rewritten between hashing and decoding ------------------------------------------------------


def test_a_file_rewritten_while_being_indexed_keeps_no_descriptor_of_other_content(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lookalike.collection.sync as sync_module

    photos = copy_sample(tmp_path / "photos")
    hash_file = sync_module.sha256_file

    def hash_then_rewrite(path: Path) -> str:
        digest = hash_file(path)
        if Path(path).name == "cat.jpg":  # someone saves another picture over it right after the hash
            shutil.copyfile(photos / "rocket.jpg", path)
        return digest

    monkeypatch.setattr(sync_module, "sha256_file", hash_then_rewrite)
    with Collection.create(tmp_path / "col", SETTINGS, root=photos) as collection:
        report = collection.sync()
        assert [name for name, _ in report.failed] == ["cat.jpg"]
        assert "changed while being indexed" in report.failed[0][1]
        assert collection.record("cat.jpg") is None
        monkeypatch.setattr(sync_module, "sha256_file", hash_file)
        collection.sync()
        cat, rocket = collection.record("cat.jpg"), collection.record("rocket.jpg")
        assert (
            cat is not None and rocket is not None and cat.sha256 == rocket.sha256 and cat.row == rocket.row
        )


# -- 5. a damaged faiss index ------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garble", "truncate", "empty", "meta"])
def test_a_damaged_index_is_rebuilt_never_used(
    damaged: tuple[Path, Path], damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    _, path = damaged
    before = baseline(path)
    index_file = path / INDEX
    size = index_file.stat().st_size
    if damage == "garble":
        with open(index_file, "r+b") as handle:
            handle.seek(size // 2)
            handle.write(np.full(64, 1e30, np.float32).tobytes())
    elif damage == "truncate":
        os.truncate(index_file, size // 3)
    elif damage == "empty":
        os.truncate(index_file, 0)
    else:
        (path / INDEX_META).write_text('{"generation": ')
    findings = check_collection(path).findings
    assert [f.part for f in findings] == ["index"]
    with caplog.at_level(logging.WARNING):
        assert baseline(path) == before
    assert damage == "meta" or "rebuilt" in caplog.text
    assert not check_collection(path, repair=True).damaged
    assert not check_collection(path).findings
    assert baseline(path) == before


# -- 6. FIFOs -----------------------------------------------------------------------------------------------


def test_a_fifo_named_like_a_photo_never_hangs_anything(pristine: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = pristine
    queries = copy_sample(tmp_path / "queries")
    fifo = queries / "x.jpg"
    os.mkfifo(fifo)
    with Collection.open(path, readonly=True) as collection:
        results = finishes(lambda: collection.search_files([fifo, queries / "cat.jpg"], k=1), fifo)
        assert results[0].error and "not a regular file" in results[0].error  # type: ignore[index]
        assert results[1].hits[0].path == "cat.jpg"  # type: ignore[index]
        with pytest.raises(ImageError, match="not a regular file"):
            finishes(lambda: collection.search(fifo), fifo)
    code, output = finishes(lambda: run("search", str(queries), "-c", str(path), "--json"), fifo)  # type: ignore[misc]
    assert code == 0 and "x.jpg: not a regular file" in output
    out = str(tmp_path / "described.npz")
    code, output = finishes(lambda: run("describe", str(queries), "-o", out, "--imsize", "96"), fifo)  # type: ignore[misc]
    assert code == 0 and "x.jpg" in output and "not a regular file" in output


def test_a_fifo_swapped_in_for_an_indexed_file_is_reported(
    damaged: tuple[Path, Path], tmp_path: Path
) -> None:
    photos = copy_sample(tmp_path / "photos")
    with Collection.create(tmp_path / "col", SETTINGS, root=photos) as collection:
        collection.sync()
        (photos / "cat.jpg").unlink()
        os.mkfifo(photos / "cat.jpg")
        report = finishes(collection.sync, photos / "cat.jpg")
        assert report.failed == [("cat.jpg", "not a regular file (a FIFO, socket or device)")]  # type: ignore[union-attr]


# -- 7. ids no image can have ------------------------------------------------------------------------------


@pytest.mark.parametrize("image_id", [2**63, 2**64 + 5, 99999999999999999999, -1, 0])
def test_impossible_ids_are_not_found_not_crashes(pristine: tuple[Path, Path], image_id: int) -> None:
    _, path = pristine
    with Collection.open(path, readonly=True) as collection:
        assert collection.records([image_id]) == {}
        with pytest.raises(CollectionError, match="not indexed"):
            collection.search(image_id)
    code, output = run("search", f"id:{image_id}", "-c", str(path))
    assert code != 0 and "no image has the id" in output


# -- 8. storage failures ------------------------------------------------------------------------------------


@pytest.mark.parametrize("offset", [0, 100, 4096, "middle"])
def test_a_garbled_database_is_a_clear_error(damaged: tuple[Path, Path], offset: int | str) -> None:
    _, path = damaged
    before = baseline(path)
    database = path / store.DATABASE
    at = database.stat().st_size // 2 if offset == "middle" else int(offset)
    with open(database, "r+b") as handle:
        handle.seek(at)
        handle.write(bytes(range(7, 7 + 200)))
    try:
        after = baseline(path)
    except LookalikeError as exc:
        assert "check" in str(exc) or "damaged" in str(exc) or "lookalike" in str(exc), exc
    else:
        assert after == before  # the bytes hit no data that search reads
    for command in (("info",), ("search", "id:1"), ("check",)):
        code, output = run(*command, "-c", str(path))
        assert code in (0, 1), output
        assert "Traceback" not in output


def test_a_database_that_is_not_one_is_refused_then_rebuilt_without_describing_again(
    damaged: tuple[Path, Path], pristine: tuple[Path, Path]
) -> None:
    photos, path = damaged
    (path / store.DATABASE).write_bytes(b"this is not a database at all" * 200)
    for command in (("info",), ("search", "id:1"), ("index", str(photos))):
        code, output = run(*command, "-c", str(path))
        assert code == 1 and "damaged" in output and "lookalike check" in output, output
    code, output = run("check", "-c", str(path))
    assert code == 1 and "--repair" in output
    code, output = run("check", "-c", str(path), "--repair")
    assert code == 0 and f"{len(NAMES)} descriptors taken back" in output, output
    assert "0 images described again" in output
    assert baseline(path) == baseline(pristine[1])
    assert not check_collection(path).findings


@pytest.mark.parametrize("column", ["path", "row", "sha256"])
def test_a_record_changed_on_disk_is_never_another_files_result(
    damaged: tuple[Path, Path], pristine: tuple[Path, Path], column: str
) -> None:
    _, path = damaged
    connection = sqlite3.connect(path / store.DATABASE)  # what a flipped bit in a page does: no checksum kept
    value = {"path": "'cbt.jpg'", "row": "(row + 1) % 10", "sha256": "'0' || substr(sha256, 2)"}[column]
    connection.execute(f"UPDATE images SET {column} = {value} WHERE path = 'cat.jpg'")
    connection.commit()
    connection.close()
    with pytest.raises(DamagedCollectionError, match="record of image"):
        baseline(path)
    code, output = run("search", "id:1", "-c", str(path))
    assert code == 1 and "--repair" in output
    assert check_collection(path).damaged
    assert not check_collection(path, repair=True).damaged
    assert baseline(path) == baseline(pristine[1])


@pytest.fixture
def growing(tmp_path: Path) -> Iterator[tuple[Path, Collection]]:
    """Half the sample indexed; the other half arrives when the test syncs again."""
    photos = tmp_path / "photos"
    copy_sample(photos)
    later = tmp_path / "later"
    later.mkdir()
    for name in NAMES[5:]:
        shutil.move(photos / name, later / name)
    collection = Collection.create(tmp_path / "col", SETTINGS, root=photos)
    collection.sync()
    for name in NAMES[5:]:
        shutil.move(later / name, photos / name)
    yield photos, collection
    collection.close()


def assert_resumes(photos: Path, collection: Collection) -> None:
    """The collection still answers, and a re-run finishes the job."""
    assert len(collection.search(1, k=3)) == 3
    report = collection.sync()
    assert report.failed == [] and sorted(collection.images()) == NAMES
    assert not check_collection(collection.path).damaged


def test_a_full_disk_while_writing_descriptors(
    growing: tuple[Path, Collection], monkeypatch: pytest.MonkeyPatch
) -> None:
    photos, collection = growing

    def no_space(*args: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lookalike.collection.vectors.os.pwrite", no_space)
    with pytest.raises(CollectionError, match=r"No space left on device.*run the command again"):
        collection.sync(commit_every=2)
    monkeypatch.undo()
    assert sorted(collection.images()) == NAMES[:5]
    assert_resumes(photos, collection)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (needs root, as CI runs); skipped where mounting is not allowed."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("left", [2_000, 12_000, 40_000, 90_000, 150_000])
def test_a_really_full_disk_is_one_clear_error_and_the_run_resumes(
    tmp_path: Path, small_disk: Path, left: int
) -> None:
    photos = copy_sample(tmp_path / "photos")
    later = tmp_path / "later"
    later.mkdir()
    for name in NAMES[3:]:
        shutil.move(photos / name, later / name)
    path = small_disk / "collection"
    with Collection.create(path, SETTINGS, root=photos) as collection:
        collection.sync()
    for name in NAMES[3:]:
        shutil.move(later / name, photos / name)
    filler = small_disk / "filler"
    free = shutil.disk_usage(small_disk).free
    with open(filler, "wb") as handle:
        handle.write(bytes(max(free - left, 0)))
    code, output = run("index", str(photos), "-c", str(path), "--commit-every", "2", "--quiet")
    assert "Traceback" not in output
    if code != 0:
        assert code == 1 and ("No space left" in output or "disk is full" in output), output
        assert "no transaction is active" not in output
    code, output = run("search", "id:1", "-c", str(path), "-k", "2", "--json")
    assert code == 0 and '"rank": 1' in output, output  # usable while the disk is still full
    filler.unlink()
    code, output = run("index", str(photos), "-c", str(path), "--quiet")
    assert code == 0, output
    with Collection.open(path, readonly=True) as collection:
        assert sorted(collection.images()) == NAMES
    assert not check_collection(path).damaged


def test_an_index_that_cannot_be_saved_leaves_the_collection_usable(
    growing: tuple[Path, Collection], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    photos, collection = growing

    def no_space(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr("lookalike.collection.ann.atomic_write", no_space)
    with caplog.at_level(logging.WARNING):
        report = collection.sync()
    assert report.failed == [] and "not saved" in caplog.text
    monkeypatch.undo()
    assert_resumes(photos, collection)


def test_a_vector_file_shortened_by_a_damaged_row_count_is_never_cut(damaged: tuple[Path, Path]) -> None:
    photos, path = damaged
    connection = sqlite3.connect(path / store.DATABASE)
    connection.execute("UPDATE settings SET value = '2' WHERE key = 'vector_rows'")
    connection.commit()
    connection.close()
    size = (path / VECTORS).stat().st_size
    code, output = run("index", str(photos), "-c", str(path))
    assert code == 1 and "refers to row" in output
    assert (path / VECTORS).stat().st_size == size


# -- 9. unreadable query files are reported ----------------------------------------------------------------


def test_search_of_a_folder_reports_unreadable_files(pristine: tuple[Path, Path], tmp_path: Path) -> None:
    _, path = pristine
    queries = copy_sample(tmp_path / "queries")
    (queries / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")
    code, output = run("search", str(queries), "-c", str(path), "-k", "1", "--json")
    assert code == 0
    assert "skipped" in output and "broken.jpg" in output


# -- every collection file, truncated or garbled at several offsets ----------------------------------------

FILES = (store.DATABASE, VECTORS, INDEX, INDEX_META, "whitening.npz")
DAMAGES = ("zero", "half", "garble-start", "garble-middle", "garble-end")


def damage_file(path: Path, damage: str) -> None:
    size = path.stat().st_size
    if damage == "zero":
        os.truncate(path, 0)
    elif damage == "half":
        os.truncate(path, size // 2)
    else:
        at = {"garble-start": 0, "garble-middle": size // 2, "garble-end": max(size - 64, 0)}[damage]
        with open(path, "r+b") as handle:
            handle.seek(at)
            handle.write(bytes((i * 37 + 11) % 256 for i in range(64)))


@pytest.fixture(scope="module")
def whitened(pristine: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pristine collection with whitening, so every file of a collection exists."""
    from lookalike.collection.fitting import fit_collection_pca

    path = tmp_path_factory.mktemp("whitened") / "collection"
    shutil.copytree(pristine[1], path)
    with Collection.open(path) as collection:
        collection.set_whitening(fit_collection_pca(collection, dim=4))
        collection.index()
    return path


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("name", FILES)
def test_damage_to_any_file_is_an_error_or_repaired_never_wrong(
    whitened: Path, pristine: tuple[Path, Path], tmp_path: Path, name: str, damage: str
) -> None:
    path = tmp_path / "collection"
    shutil.copytree(whitened, path)
    before = baseline(path)
    by_file = {}
    with Collection.open(path, readonly=True) as collection:
        by_file = {
            n: [h.path for h in collection.search(collection.absolute_path(n), k=2)] for n in NAMES[:3]
        }
    damage_file(path / name, damage)
    try:
        after = baseline(path)
    except LookalikeError:
        pass  # a clear error
    else:
        assert after == before
    try:
        with Collection.open(path, readonly=True) as collection:
            found = {
                n: [h.path for h in collection.search(collection.absolute_path(n), k=2)] for n in NAMES[:3]
            }
        assert found == by_file
    except LookalikeError:
        pass
    report = check_collection(path, repair=True)
    if report.damaged:  # only the database cannot be rebuilt here
        assert name == store.DATABASE, report.findings
        return
    if any(f.part == "whitening" for f in report.findings):
        before = baseline(pristine[1])  # the repair removed the unreadable whitening
    assert baseline(path) == before
