"""Incremental indexing: new and changed files described, deleted ones forgotten, unchanged ones skipped.

Work is committed every ``commit_every`` files: descriptors are written and fsynced first, then one SQLite
transaction records the images, their contents and the new row count. A run killed at any point (even
SIGKILL) leaves a consistent collection; the next run resumes with nothing lost or doubled.

A :class:`Syncer` is given the database, the descriptor file, the describer and how files are named through
its constructor; the caller holds the write lock and brings the index up to date afterwards.
"""

from __future__ import annotations

import logging
import sqlite3
import stat as stat_module
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from lookalike.collection import store
from lookalike.collection.layout import DATABASE, ROW_HASHES
from lookalike.collection.recovery import RowHashes
from lookalike.collection.vectors import VectorFile, row_checksums
from lookalike.errors import CollectionError, ImageError
from lookalike.extract import Describer
from lookalike.images import sha256_of_file as sha256_file
from lookalike.local.cache import describe_file
from lookalike.local.features import LocalDescriber
from lookalike.walk import walk_images

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


class Names(Protocol):
    """How the collection names files: relative to its root when under it, else absolute."""

    def relative_path(self, path: str | Path) -> str: ...

    def absolute_path(self, name: str) -> Path: ...


def file_state(names: Names, path: Path) -> FileState:
    name = names.relative_path(path)
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


def plan(known: dict[str, store.ImageRecord], states: list[FileState]) -> tuple[list[FileState], int]:
    """The files to (re)describe, and how many are unchanged (same size and mtime as recorded)."""
    todo, unchanged = [], 0
    for state in states:
        record = known.get(state.name)
        if record is not None and (record.size, record.mtime_ns) == (state.size, state.mtime_ns):
            unchanged += 1
        else:
            todo.append(state)
    return todo, unchanged


def usable_descriptor(vector: np.ndarray) -> bool:
    """Finite, and not all zero: a row that could rank anything at all."""
    return bool(np.isfinite(vector).all() and np.any(vector != 0))


@dataclass
class _Outcome:
    state: FileState
    status: str
    error: str | None = None
    row: int | None = None
    size: tuple[int, int] | None = None
    new_content: bool = False
    local: bytes | None = None  # the content's local features, stored form, when the collection keeps them


class Syncer:
    """Records files in ``db`` and their descriptors in ``vectors``, described by ``describer`` and named by
    ``names``. The row hashes (see :mod:`~lookalike.collection.recovery`) and the database sit beside
    ``vectors``. ``local``, when given, also computes each new content's local features, committed in the
    same transaction as its descriptor. The caller holds the collection's write lock for each run."""

    def __init__(
        self,
        db: sqlite3.Connection,
        vectors: VectorFile,
        describer: Describer,
        names: Names,
        local: LocalDescriber | None = None,
    ) -> None:
        self.db = db
        self.vectors = vectors
        self.describer = describer
        self.names = names
        self.local = local
        self.hashes = RowHashes(vectors.path.with_name(ROW_HASHES))
        self.database = vectors.path.with_name(DATABASE)
        self._rows = 0

    def sync(self, root: Path, progress: ProgressCallback | None, commit_every: int) -> SyncReport:
        """Bring the records in line with the image files under ``root``: new and changed files described,
        files gone from under ``root`` forgotten."""
        if not root.is_dir():
            raise CollectionError(f"{root} is not a folder")
        with store.storage_errors(self.database):
            self._rows = int(store.read_settings(self.db)["vector_rows"])
            states = [file_state(self.names, path) for path in walk_images(root)]
            present = {state.name for state in states}
            known = store.all_images(self.db)
            gone = [r.id for name, r in known.items() if name not in present and self._under(name, root)]
            report = SyncReport(removed=len(gone))
            if gone:
                self._commit([], np.zeros((0, self.vectors.dim), np.float32), delete=gone)
            todo, report.unchanged = plan(known, states)
            self._describe_and_commit(todo, report, progress, commit_every)
            self._complete_local_features(progress, commit_every)
        return report

    def add(
        self, paths: Iterable[str | Path], progress: ProgressCallback | None, commit_every: int
    ) -> SyncReport:
        """Describe and record these files (new or changed ones only); nothing is removed."""
        with store.storage_errors(self.database):
            self._rows = int(store.read_settings(self.db)["vector_rows"])
            states = [file_state(self.names, Path(p)) for p in paths]
            todo, unchanged = plan(store.all_images(self.db), states)
            report = SyncReport(unchanged=unchanged)
            self._describe_and_commit(todo, report, progress, commit_every)
            self._complete_local_features(progress, commit_every)
        return report

    def _complete_local_features(self, progress: ProgressCallback | None, commit_every: int) -> None:
        """Local features for the contents indexed before the collection was asked to keep them."""
        if self.local is None:
            return
        todo = store.contents_without_local_features(self.db, self.local.identity)
        for start in range(0, len(todo), commit_every):
            found: dict[str, bytes] = {}
            for done, (sha, name, size, mtime_ns) in enumerate(todo[start : start + commit_every], start + 1):
                path = self.names.absolute_path(name)
                state = file_state(self.names, path)
                if (state.error, state.size, state.mtime_ns) == (None, size, mtime_ns):
                    data = self._local_features(state)
                    if data is not None:
                        found[sha] = data
                if progress is not None:
                    progress(SyncProgress(done, len(todo), name, "local features"))
            with store.transaction(self.db):
                store.add_local_features(self.db, self.local.identity, found)

    def _under(self, name: str, root: Path) -> bool:
        try:
            self.names.absolute_path(name).relative_to(root.resolve())
            return True
        except ValueError:
            return False

    def _describe_and_commit(
        self, todo: list[FileState], report: SyncReport, progress: ProgressCallback | None, commit_every: int
    ) -> None:
        if commit_every < 1:
            raise CollectionError("commit_every must be at least 1")
        done = 0
        with ThreadPoolExecutor(max_workers=2) as pool:
            for start in range(0, len(todo), commit_every):
                chunk = list(pool.map(hashed, todo[start : start + commit_every]))
                outcomes, vectors = self._describe_chunk(chunk)
                self._commit(outcomes, vectors)
                for state, outcome in zip(chunk, outcomes, strict=True):
                    done += 1
                    _tally(report, state, outcome)
                    if progress is not None:
                        progress(SyncProgress(done, len(todo), state.name, outcome.status))

    def _describe_chunk(self, chunk: list[FileState]) -> tuple[list[_Outcome], np.ndarray]:
        """Outcomes for a chunk, and the descriptor rows it adds: each distinct new content is described
        once."""
        first_of: dict[str, FileState] = {}
        for state in chunk:
            if (
                state.error is None
                and state.sha256 not in first_of
                and store.content_row(self.db, state.sha256 or "") is None
            ):
                first_of[state.sha256 or ""] = state
        firsts = list(first_of.values())
        rows: dict[str, int] = {}
        sizes: dict[str, tuple[int, int] | None] = {}
        failures: dict[str, str] = {}
        changed: set[str] = set()
        vectors: list[np.ndarray] = []
        for result in self.describer.describe_files([state.path for state in firsts]):
            sha = firsts[result.index].sha256 or ""
            if result.vector is None:
                failures[sha] = result.error.reason if result.error else "unreadable"
            elif result.sha256 != sha:
                changed.add(sha)  # rewritten between hashing and decoding: its pixels are not that content
            elif not usable_descriptor(result.vector):
                failures[sha] = "its descriptor is not finite or is zero (the network gave no usable output)"
            else:
                rows[sha], sizes[sha] = self._rows + len(vectors), result.size
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
                local = self._local_features(state) if new else None
                outcomes.append(
                    _Outcome(state, "ok", row=rows[sha], size=sizes[sha], new_content=new, local=local)
                )
            else:
                row = store.content_row(self.db, sha)
                size = store.content_size(self.db, row) if row is not None else None
                outcomes.append(_Outcome(state, "ok", row=row, size=size))
        matrix = np.stack(vectors) if vectors else np.zeros((0, self.vectors.dim), np.float32)
        return outcomes, matrix

    def _local_features(self, state: FileState) -> bytes | None:
        if self.local is None:
            return None
        features = describe_file(state.path, self.local)
        return None if features is None else features.to_bytes()

    def _commit(self, outcomes: list[_Outcome], vectors: np.ndarray, delete: list[int] | None = None) -> None:
        """Descriptors first (written and fsynced), then one transaction that records what refers to them."""
        start_row = self._rows
        if len(vectors):
            self.vectors.write(start_row, vectors)
            new_rows = sorted(
                (o.row, o.state.sha256 or "") for o in outcomes if o.new_content and o.row is not None
            )
            self.hashes.write(start_row, [sha for _, sha in new_rows])
        checksums = row_checksums(vectors)
        with store.transaction(self.db):
            if delete:
                store.delete_images(self.db, delete)
            next_id = store.next_image_id(self.db)
            for outcome in outcomes:
                if outcome.status == "retry":
                    continue  # not recorded: the next run sees it as new
                if outcome.new_content and outcome.row is not None:
                    crc = checksums[outcome.row - start_row]
                    store.add_content(self.db, outcome.row, outcome.state.sha256 or "", crc)
                    if outcome.local is not None and self.local is not None:
                        store.add_local_features(
                            self.db, self.local.identity, {outcome.state.sha256 or "": outcome.local}
                        )
                next_id = store.record_image(self.db, _image_record(outcome), next_id)
            store.delete_orphan_contents(self.db)
            store.write_settings(self.db, {"vector_rows": start_row + len(vectors)})
            store.bump_generation(self.db)
        self._rows = start_row + len(vectors)


def _image_record(outcome: _Outcome) -> store.ImageRecord:
    state = outcome.state
    width, height = outcome.size or (None, None)
    return store.ImageRecord(
        store.UNASSIGNED_ID, state.name, state.size, state.mtime_ns, state.sha256, width, height,
        outcome.status, outcome.error, outcome.row,
    )  # fmt: skip


def _tally(report: SyncReport, state: FileState, outcome: _Outcome) -> None:
    if outcome.status in ("failed", "retry"):
        report.failed.append((state.name, outcome.error or "unknown error"))
    elif outcome.new_content:
        report.indexed += 1
    else:
        report.reused += 1
