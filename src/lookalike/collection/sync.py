"""Incremental indexing: new and changed files described, deleted ones forgotten, unchanged ones skipped.

Work is committed every ``commit_every`` files: descriptors are written and fsynced first, then one SQLite
transaction records the images, their contents and the new row count. A run killed at any point (even
SIGKILL) leaves a consistent collection; the next run resumes with nothing lost or doubled.
"""

from __future__ import annotations

import logging
import sqlite3
import stat as stat_module
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from lookalike.collection import store
from lookalike.collection.recovery import ROW_HASHES, RowHashes
from lookalike.collection.vectors import row_checksums
from lookalike.errors import CollectionError, ImageError
from lookalike.images import sha256_of_file as sha256_file
from lookalike.walk import walk_images

if TYPE_CHECKING:
    from lookalike.collection.collection import Collection
    from lookalike.extract import Extractor

log = logging.getLogger(__name__)

DEFAULT_COMMIT_EVERY = 64
CHANGED_WHILE_READ = "changed while being indexed; it is indexed on the next run"


@dataclass(frozen=True)
class FileState:
    name: str
    path: Path
    size: int
    mtime_ns: int
    sha256: str | None = None
    error: str | None = None


@dataclass
class SyncReport:
    """What a run did. ``failed`` holds (path, reason) for files this run could not describe."""

    indexed: int = 0
    reused: int = 0
    unchanged: int = 0
    removed: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.indexed / self.seconds if self.seconds > 0 else 0.0


@dataclass(frozen=True)
class SyncProgress:
    """Sent after each file: how far the run is and what happened to ``name``."""

    done: int
    total: int
    name: str
    outcome: str


ProgressCallback = Callable[[SyncProgress], None]


def file_state(collection: Collection, path: Path) -> FileState:
    name = collection.relative_path(path)
    try:
        stat = path.stat()
    except OSError as exc:
        return FileState(name, path, 0, 0, error=f"cannot stat: {exc.strerror or exc}")
    if not stat_module.S_ISREG(stat.st_mode):
        # Reading a FIFO would block forever; a socket or device is no image either.
        error = "not a regular file (a FIFO, socket or device)"
        return FileState(name, path, stat.st_size, stat.st_mtime_ns, error=error)
    return FileState(name, path, stat.st_size, stat.st_mtime_ns)


def hashed(state: FileState) -> FileState:
    if state.error is not None:
        return state
    try:
        return FileState(state.name, state.path, state.size, state.mtime_ns, sha256=sha256_file(state.path))
    except ImageError as exc:
        return FileState(state.name, state.path, state.size, state.mtime_ns, error=exc.reason)


def plan(collection: Collection, states: list[FileState]) -> tuple[list[FileState], int]:
    """The files to (re)describe, and how many are unchanged (same size and mtime as recorded)."""
    known = collection.images()
    todo, unchanged = [], 0
    for state in states:
        record = known.get(state.name)
        if record is not None and (record.size, record.mtime_ns) == (state.size, state.mtime_ns):
            unchanged += 1
        else:
            todo.append(state)
    return todo, unchanged


def sync(
    collection: Collection,
    root: Path,
    progress: ProgressCallback | None = None,
    commit_every: int = DEFAULT_COMMIT_EVERY,
) -> SyncReport:
    """Bring the collection in line with the image files under ``root``."""
    if not root.is_dir():
        raise CollectionError(f"{root} is not a folder")
    collection.extractor  # noqa: B018 -- build the network before the clock starts
    started = time.perf_counter()
    with collection.writing():
        states = [file_state(collection, path) for path in walk_images(root)]
        present = {state.name for state in states}
        gone = [
            r.id
            for name, r in collection.images().items()
            if name not in present and _under(collection, name, root)
        ]
        report = SyncReport(removed=len(gone))
        if gone:
            _commit(collection, [], np.zeros((0, collection.dim), np.float32), delete=gone)
        todo, report.unchanged = plan(collection, states)
        _describe_and_commit(collection, todo, report, progress, commit_every)
        collection.index()
    report.seconds = time.perf_counter() - started
    return report


def add(
    collection: Collection,
    paths: Iterable[str | Path],
    progress: ProgressCallback | None = None,
    commit_every: int = DEFAULT_COMMIT_EVERY,
) -> SyncReport:
    """Describe and record these files (new or changed ones only); nothing is removed."""
    collection.extractor  # noqa: B018 -- build the network before the clock starts
    started = time.perf_counter()
    with collection.writing():
        states = [file_state(collection, Path(p)) for p in paths]
        todo, unchanged = plan(collection, states)
        report = SyncReport(unchanged=unchanged)
        _describe_and_commit(collection, todo, report, progress, commit_every)
        collection.index()
    report.seconds = time.perf_counter() - started
    return report


def _under(collection: Collection, name: str, root: Path) -> bool:
    path = collection.absolute_path(name)
    try:
        path.relative_to(root.resolve())
        return True
    except ValueError:
        return False


def _describe_and_commit(
    collection: Collection,
    todo: list[FileState],
    report: SyncReport,
    progress: ProgressCallback | None,
    commit_every: int,
) -> None:
    if commit_every < 1:
        raise CollectionError("commit_every must be at least 1")
    extractor = collection.extractor
    done = 0
    with ThreadPoolExecutor(max_workers=2) as pool:
        for start in range(0, len(todo), commit_every):
            chunk = list(pool.map(hashed, todo[start : start + commit_every]))
            outcomes, vectors = _describe_chunk(collection, extractor, chunk)
            _commit(collection, outcomes, vectors)
            for state, outcome in zip(chunk, outcomes, strict=True):
                done += 1
                _tally(report, state, outcome)
                if progress is not None:
                    progress(SyncProgress(done, len(todo), state.name, outcome.status))


@dataclass
class _Outcome:
    state: FileState
    status: str
    error: str | None = None
    row: int | None = None
    size: tuple[int, int] | None = None
    new_content: bool = False


def _describe_chunk(
    collection: Collection, extractor: Extractor, chunk: list[FileState]
) -> tuple[list[_Outcome], np.ndarray]:
    """Outcomes for a chunk, and the descriptor rows it adds: each distinct new content is described once."""
    first_of: dict[str, FileState] = {}
    for state in chunk:
        if (
            state.error is None
            and state.sha256 not in first_of
            and store.content_row(collection.db, state.sha256 or "") is None
        ):
            first_of[state.sha256 or ""] = state
    firsts = list(first_of.values())
    next_row = int(collection.settings["vector_rows"])
    rows: dict[str, int] = {}
    sizes: dict[str, tuple[int, int] | None] = {}
    failures: dict[str, str] = {}
    changed: set[str] = set()
    vectors: list[np.ndarray] = []
    for result in extractor.describe_files([state.path for state in firsts]):
        sha = firsts[result.index].sha256 or ""
        if result.vector is None:
            failures[sha] = result.error.reason if result.error else "unreadable"
        elif result.sha256 != sha:
            changed.add(sha)  # rewritten between hashing and decoding: its pixels are not that content
        elif not usable_descriptor(result.vector):
            failures[sha] = "its descriptor is not finite or is zero (the network gave no usable output)"
        else:
            rows[sha], sizes[sha] = next_row + len(vectors), result.size
            vectors.append(result.vector)
    outcomes = []
    for state in chunk:
        sha = state.sha256 or ""
        if sha in changed:
            outcomes.append(_Outcome(state, "retry", error=CHANGED_WHILE_READ))
        elif state.error is not None or sha in failures:
            outcomes.append(_Outcome(state, "failed", error=state.error or failures[sha]))
        elif sha in rows:
            new = first_of.get(sha) is state
            outcomes.append(_Outcome(state, "ok", row=rows[sha], size=sizes[sha], new_content=new))
        else:
            row = store.content_row(collection.db, sha)
            size = store.content_size(collection.db, row) if row is not None else None
            outcomes.append(_Outcome(state, "ok", row=row, size=size))
    matrix = np.stack(vectors) if vectors else np.zeros((0, collection.dim), np.float32)
    return outcomes, matrix


def usable_descriptor(vector: np.ndarray) -> bool:
    """Finite, and not all zero: a row that could rank anything at all."""
    return bool(np.isfinite(vector).all() and np.any(vector != 0))


def _commit(
    collection: Collection, outcomes: list[_Outcome], vectors: np.ndarray, delete: list[int] | None = None
) -> None:
    """Descriptors first (written and fsynced), then one transaction that records what refers to them."""
    start_row = int(collection.settings["vector_rows"])
    if len(vectors):
        collection.vectors.write(start_row, vectors)
        new_rows = sorted(
            (o.row, o.state.sha256 or "") for o in outcomes if o.new_content and o.row is not None
        )
        RowHashes(collection.path / ROW_HASHES).write(start_row, [sha for _, sha in new_rows])
    checksums = row_checksums(vectors)
    db = collection.db
    try:
        with store.transaction(db):
            if delete:
                store.delete_images(db, delete)
            next_id = store.next_image_id(db)
            for outcome in outcomes:
                if outcome.status == "retry":
                    continue  # not recorded: the next run sees it as new
                if outcome.new_content and outcome.row is not None:
                    crc = checksums[outcome.row - start_row]
                    store.add_content(db, outcome.row, outcome.state.sha256 or "", crc)
                next_id = store.record_image(db, _image_row(outcome), next_id)
            store.delete_orphan_contents(db)
            store.write_settings(db, {"vector_rows": start_row + len(vectors)})
            collection._settings["vector_rows"] = start_row + len(vectors)
            collection._bump_generation()
    except BaseException as exc:
        collection.refresh_settings()
        if isinstance(exc, sqlite3.Error):
            raise store.storage_error(exc, collection.path / store.DATABASE) from exc
        raise


def _image_row(outcome: _Outcome) -> store.ImageRow:
    state = outcome.state
    width, height = outcome.size or (None, None)
    return store.ImageRow(
        state.name, state.size, state.mtime_ns, state.sha256, width, height, outcome.status, outcome.error,
        outcome.row,
    )  # fmt: skip


def _tally(report: SyncReport, state: FileState, outcome: _Outcome) -> None:
    if outcome.status in ("failed", "retry"):
        report.failed.append((state.name, outcome.error or "unknown error"))
    elif outcome.new_content:
        report.indexed += 1
    else:
        report.reused += 1
