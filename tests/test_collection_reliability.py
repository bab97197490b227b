"""Collections on hostile folders and under hostile conditions: broken and odd files, symlink loops, a
SIGKILL at any point of a run, and a reader searching while a writer indexes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from lookalike.collection import Collection
from lookalike.extract import DescriptorSettings
from lookalike.walk import walk_images
from tests.corpus import (
    HAS_HEIF,
    SAMPLE_PHOTOS,
    bomb_png,
    encode,
    exif_with_orientation,
    photo_family,
    shared_resnet50_network,  # noqa: F401 (autouse fixture)
    variant,
)

SETTINGS = DescriptorSettings(imsize=128, precision="fp32")
INDEX_OPTIONS = ("--imsize", "128", "--precision", "fp32", "--quiet")
FAMILY = 40
DIM = 2048
Contents = dict[str, tuple[int, np.ndarray]]

pytestmark = pytest.mark.weights


def sample(stem: str) -> Path:
    return next(p for p in SAMPLE_PHOTOS if p.stem == stem)


def wait_for(condition: Callable[[], bool], timeout: float, what: str, interval: float = 0.01) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def committed_images(collection: Path) -> int:
    """Images the collection's database holds, read without writing anything (0 while it does not exist)."""
    database = collection / "collection.sqlite"
    if not database.exists():
        return 0
    try:
        with sqlite3.connect(f"{database.as_uri()}?mode=ro", uri=True) as db:
            return int(db.execute("SELECT COUNT(*) FROM images").fetchone()[0])
    except sqlite3.OperationalError:
        return 0


def index_command(folder: Path, collection: Path, *options: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lookalike",
        "index",
        str(folder),
        "--collection",
        str(collection),
        *options,
    ]


# -- a folder of odd and broken files ---------------------------------------------------------------------

GOOD = {
    "été photo 1.jpg": lambda: encode(variant(sample("cat"), "whole"), "JPEG", quality=90),
    "日本.png": lambda: encode(variant(sample("coffee"), "crop"), "PNG"),
    "sixteen-bit.png": lambda: encode(
        Image.fromarray(np.asarray(variant(sample("cells"), "whole").convert("L"), np.uint16) * 257), "PNG"
    ),
    "cmyk.jpg": lambda: encode(variant(sample("astronaut"), "whole").convert("CMYK"), "JPEG", quality=90),
    "animated.gif": lambda: encode(
        variant(sample("hubble"), "whole"),
        "GIF",
        save_all=True,
        append_images=[variant(sample("rocket"), "whole").resize((384, 335))],
        duration=100,
    ),
    "motorcycle.jpg": lambda: encode(variant(sample("motorcycle-left"), "whole"), "JPEG", quality=90),
    # Stored sideways, upright per EXIF: orientation 6 turns the stored pixels 90° clockwise.
    "sideways.jpg": lambda: encode(
        variant(sample("motorcycle-left"), "whole").rotate(90, expand=True),
        "JPEG",
        quality=90,
        exif=exif_with_orientation(6),
    ),
    "sub folder/rocket.jpg": lambda: encode(variant(sample("rocket"), "crop"), "JPEG", quality=90),
    "loop/inside.jpg": lambda: encode(variant(sample("cat"), "flip"), "JPEG", quality=90),
}
if HAS_HEIF:
    GOOD["photo.heic"] = lambda: encode(variant(sample("coffee-rotated-dark"), "whole"), "HEIF", quality=90)

# name → words one of which the failure reason must contain (lower case)
BAD = {
    "truncated.jpg": ("truncated",),
    "empty.jpg": ("empty", "0 bytes"),
    "text.jpg": ("not an image",),
    "bomb.png": ("pixels exceeds the limit", "pixels) exceeds limit"),
    "fifo.jpg": ("not a regular file",),
    "dangling.jpg": ("no such file",),
}
RUNNING_AS_ROOT = os.geteuid() == 0
if not RUNNING_AS_ROOT:
    BAD["secret.jpg"] = ("permission denied",)


def hostile_folder(root: Path) -> Path:
    root.mkdir()
    for name, make in GOOD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(make())
    whole = encode(variant(sample("cells"), "whole"), "JPEG", quality=90)
    (root / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.jpg").write_text("a shopping list, not a picture\n" * 10)
    (root / "bomb.png").write_bytes(bomb_png(30_000))
    os.mkfifo(root / "fifo.jpg")
    (root / "dangling.jpg").symlink_to(root / "gone.jpg")
    if not RUNNING_AS_ROOT:
        (root / "secret.jpg").write_bytes(whole)
        (root / "secret.jpg").chmod(0)
    (root / "loop" / "again").symlink_to(root / "loop", target_is_directory=True)
    (root / ".hidden.jpg").write_bytes(whole)
    (root / ".thumbnails").mkdir()
    (root / ".thumbnails" / "t.jpg").write_bytes(whole)
    (root / "notes.txt").write_text("not an image name")
    return root


def test_a_hostile_folder_is_indexed_with_a_reason_for_every_failure(tmp_path: Path) -> None:
    photos = hostile_folder(tmp_path / "photos")
    assert (photos / "bomb.png").stat().st_size < 200_000
    walked = [p.relative_to(photos).as_posix() for p in walk_images(photos)]  # ends despite the loop
    assert sorted(walked) == sorted([*GOOD, *BAD])  # once each, nothing hidden
    with Collection.create(tmp_path / "collection", SETTINGS, root=photos) as collection:
        report = collection.sync()
        failed = dict(report.failed)
        assert sorted(failed) == sorted(BAD)
        for name, words in BAD.items():
            assert any(word in failed[name].lower() for word in words), (name, failed[name])
        assert report.indexed == len(GOOD) and report.reused == 0
        assert sorted(n for n, r in collection.images().items() if r.status == "ok") == sorted(GOOD)
        info = collection.info()
        assert (info.images, info.failed) == (len(GOOD), len(BAD))
        for name in GOOD:
            hits = collection.search(photos / name, k=2)
            assert hits[0].path == name and hits[0].score == pytest.approx(1.0, abs=1e-5), name
        sideways = collection.record("sideways.jpg")
        assert (sideways.width, sideways.height) == (384, 259)  # upright, not as stored
        hits = collection.search("sideways.jpg", k=2)
        assert hits[1].path == "motorcycle.jpg" and hits[1].score > 0.95
        assert collection.record("sixteen-bit.png").width == 384

        again = collection.sync()
        assert again.failed == [] and (again.indexed, again.reused, again.removed) == (0, 0, 0)
        assert again.unchanged == len(GOOD) + len(BAD)

        (photos / "truncated.jpg").write_bytes(encode(variant(sample("cells"), "crop-flip"), "JPEG"))
        (photos / "empty.jpg").unlink()
        repaired = collection.sync()
        assert (repaired.indexed, repaired.removed, repaired.failed) == (1, 1, [])
        assert collection.record("truncated.jpg").status == "ok"
        assert collection.info().failed == len(BAD) - 2


# -- interruption and concurrency ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("family") / "photos"
    photo_family(folder, FAMILY)
    return folder


@pytest.fixture(scope="module")
def reference(family: Path, tmp_path_factory: pytest.TempPathFactory) -> Contents:
    """Path → (id, descriptor) after an uninterrupted run."""
    with Collection.create(tmp_path_factory.mktemp("reference"), SETTINGS, root=family) as collection:
        report = collection.sync(commit_every=4)
        assert report.indexed == FAMILY
        return collection_contents(collection)


def collection_contents(collection: Collection) -> Contents:
    ids, raw = collection.raw_vectors()
    records = collection.records([int(i) for i in ids])
    return {records[int(i)].path: (int(i), row) for i, row in zip(ids, raw, strict=True)}


def assert_same_as_reference(collection_path: Path, expected: Contents) -> None:
    """Same paths with the same ids and descriptors, each content stored once, no stray descriptor rows."""
    count = len(expected)
    with Collection.open(collection_path, readonly=True) as collection:
        contents = collection_contents(collection)
        assert contents.keys() == expected.keys()
        assert {p: i for p, (i, _) in contents.items()} == {p: i for p, (i, _) in expected.items()}
        for path, (_, vector) in contents.items():
            np.testing.assert_allclose(vector, expected[path][1], atol=1e-6, err_msg=path)
        records = collection.images().values()
        assert {r.status for r in records} == {"ok"}
        assert len({r.sha256 for r in records}) == len({r.row for r in records}) == count
        info = collection.info()
        assert (info.images, info.distinct_contents) == (count, count)
        assert collection.settings["vector_rows"] == count
    assert (collection_path / "vectors.f32").stat().st_size == count * DIM * 4


def test_a_run_killed_after_some_commits_resumes_to_the_same_collection(
    family: Path, reference: Contents, tmp_path: Path
) -> None:
    collection = tmp_path / "collection"
    run = subprocess.Popen(index_command(family, collection, *INDEX_OPTIONS, "--commit-every", "4"))
    try:
        wait_for(lambda: committed_images(collection) > 0 or run.poll() is not None, 120, "a first commit")
        run.send_signal(signal.SIGKILL)
    finally:
        run.wait(timeout=60)
    assert run.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    survived = committed_images(collection)
    assert 0 < survived < FAMILY and survived % 4 == 0

    resumed = subprocess.run(
        index_command(family, collection, *INDEX_OPTIONS, "--commit-every", "4", "--json"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert (summary["indexed"], summary["unchanged"], summary["failed"]) == (FAMILY - survived, survived, [])
    assert_same_as_reference(collection, reference)


KILL_AT = textwrap.dedent(
    """
    import os, signal, sys
    from lookalike.collection import store
    from lookalike.collection.vectors import VectorFile
    from lookalike.cli.main import app

    point, folder, collection = sys.argv[1:4]

    def then_die(original, when=lambda *a: True):
        def wrapper(*args):
            result = original(*args)
            if when(*args):
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    if point == "creating the database":
        store.migrate = then_die(store.migrate)
    elif point == "descriptors written, not committed":
        VectorFile.write = then_die(VectorFile.write)
    elif point == "inside the transaction":
        store.write_settings = then_die(store.write_settings, lambda db, values: set(values) == {"vector_rows"})
    app(["index", folder, "--collection", collection, *sys.argv[4:]], prog_name="lookalike")
    """
)


@pytest.mark.parametrize(
    "point", ["creating the database", "descriptors written, not committed", "inside the transaction"]
)
def test_a_kill_during_the_first_commit_leaves_a_collection_that_opens(
    family: Path, reference: Contents, tmp_path: Path, point: str
) -> None:
    few = tmp_path / "photos"  # the first files of the family: the same ids and descriptors as the reference
    few.mkdir()
    for path in sorted(family.iterdir())[:8]:
        shutil.copy(path, few / path.name)
    expected = {p.name: reference[p.name] for p in few.iterdir()}
    collection = tmp_path / "collection"
    killed = subprocess.run(
        [sys.executable, "-c", KILL_AT, point, str(few), str(collection), *INDEX_OPTIONS],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    if point == "creating the database":
        assert not (collection / "collection.sqlite").exists()
    else:
        with Collection.open(collection, readonly=True) as opened:
            assert opened.info().images == 0
            assert opened.search_vectors(np.ones((1, DIM), np.float32)) == [[]]
        if point == "descriptors written, not committed":
            assert (collection / "vectors.f32").stat().st_size > 0  # rows no commit refers to
    with Collection.open_or_create(collection, SETTINGS, root=few) as resumed:
        report = resumed.sync(commit_every=4)
    assert (report.indexed, report.failed) == (len(expected), [])
    assert_same_as_reference(collection, expected)


def test_a_reader_searches_safely_while_a_writer_indexes(family: Path, tmp_path: Path) -> None:
    collection = tmp_path / "collection"
    writer = subprocess.Popen(
        index_command(family, collection, *INDEX_OPTIONS, "--commit-every", "2"),
        stderr=subprocess.PIPE,
        text=True,
    )
    seen_counts: set[int] = set()
    searches = 0
    try:
        wait_for(lambda: committed_images(collection) > 0 or writer.poll() is not None, 120, "a first commit")
        while True:
            finished = writer.poll() is not None
            with Collection.open(collection, readonly=True) as reader:
                ok = {r.id: r for r in reader.images().values() if r.status == "ok"}
                seen_counts.add(len(ok))
                ids = sorted(ok)
                for image_id in {ids[0], ids[len(ids) // 2], ids[-1]}:
                    hits = reader.search(image_id, k=5)
                    searches += 1
                    assert hits[0].id == image_id and hits[0].score > 0.999
                    now = reader.records([h.id for h in hits])
                    assert all(h.id in now and now[h.id].status == "ok" for h in hits)
                    assert [h.path for h in hits] == [now[h.id].path for h in hits]
            if finished:
                break
            time.sleep(0.02)  # pacing only: leave the writer a core
    finally:
        if writer.poll() is None:
            writer.kill()
        _, errors = writer.communicate(timeout=120)
    assert writer.returncode == 0, errors
    assert max(seen_counts) == FAMILY
    assert len(seen_counts) >= 3, f"the reader saw only {sorted(seen_counts)}: it never overlapped the writer"
    assert searches > 6


def test_a_stale_descriptor_tail_is_dropped_by_the_next_writer(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for stem in ("cat", "rocket"):
        ImageOps.mirror(Image.open(sample(stem))).save(photos / f"{stem}.jpg")
    with Collection.create(tmp_path / "collection", SETTINGS, root=photos) as collection:
        collection.sync()
        vectors = collection.path / "vectors.f32"
        with open(vectors, "ab") as handle:  # what a run killed before its commit leaves behind
            handle.write(np.ones((3, DIM), "<f4").tobytes())
        shutil.copy(sample("hubble"), photos / "hubble.jpg")
        assert collection.sync().indexed == 1
        assert vectors.stat().st_size == 3 * DIM * 4
        assert collection.search("hubble.jpg", k=1)[0].score == pytest.approx(1.0, abs=1e-5)
