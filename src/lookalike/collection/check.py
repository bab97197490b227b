"""`lookalike check`: verify every part of a collection against what was recorded, and repair what can be.

What is checked, cheapest first:

- the database: ``PRAGMA integrity_check`` and ``foreign_key_check`` (a damaged database cannot be rebuilt
  here: its paths and settings exist nowhere else; the way out is to index again with ``--rebuild``);
- the descriptor file: as long as the database says, and every row a content refers to finite, unit-norm and
  with the crc32 recorded when it was written;
- the faiss index: its checksum, count and ids against the collection, and a sample of its vectors and
  searches against the stored descriptors;
- the whitening file, when the collection has whitening;
- the indexed files: each still there with its recorded size and mtime (a change is no damage: ``index``
  picks it up).

``repair`` rebuilds the index from the descriptors, re-extracts damaged descriptor rows from their files (only
from a file whose content still has the recorded sha256) and forgets images whose descriptor cannot be
restored, so a search never ranks a wrong or zero descriptor. It says what it did and what it could not.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from lookalike.atomic import replace
from lookalike.collection import ann, recovery, store
from lookalike.collection.collection import Collection
from lookalike.collection.layout import (
    DATABASE,
    DERIVED,
    INDEX,
    INDEX_META,
    ROW_HASHES,
    SETTINGS_MIRROR,
    VECTORS,
    WHITENING,
)
from lookalike.collection.sync import usable_descriptor
from lookalike.collection.vectors import VectorFile, row_checksums
from lookalike.errors import CollectionError, LookalikeError
from lookalike.images import sha256_of_file

CHUNK_ROWS = 4096
SAMPLE_SEARCHES = 32
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Finding:
    """One thing found. ``damage`` is wrong data (as opposed to files changed since indexing);
    ``repair`` says what ``--repair`` did about it (None: nothing was done)."""

    part: str
    problem: str
    damage: bool = True
    repair: str | None = None


@dataclass
class CheckReport:
    path: str
    checked: dict[str, int] = field(default_factory=dict)
    findings: list[Finding] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        """Damage that is still there (found and not repaired)."""
        return any(f.damage and f.repair is None for f in self.findings)

    def as_dict(self) -> dict:
        return {"path": self.path, "checked": self.checked, "damaged": self.damaged,
                "findings": [asdict(f) for f in self.findings]}  # fmt: skip


def check_collection(path: str | Path, repair: bool = False) -> CheckReport:
    """Check the collection at ``path``; with ``repair``, rebuild and re-extract what can be."""
    path = Path(path)
    report = CheckReport(str(path))
    if not (path / DATABASE).exists() and not (path / SETTINGS_MIRROR).exists():
        raise CollectionError(f"{path} is not a lookalike collection (no {DATABASE})")
    problem = database_problem(path / DATABASE) if (path / DATABASE).exists() else f"{DATABASE} is missing"
    if problem is not None:
        action = None
        if repair:
            try:
                action = rebuild_database(path)
            except LookalikeError as exc:
                problem += f"; not rebuilt: {exc}"
        report.findings.append(
            Finding(
                "database", problem + ("" if action else _REBUILD_ADVICE.format(path=path)), repair=action
            )
        )
        if action is None:
            return report
    with Collection.open(path, readonly=not repair, verify=False) as collection:
        if repair:
            with collection.writing(trim=False):
                _check_parts(collection, report, repair)
        else:
            _check_parts(collection, report, repair)
    return report


_REBUILD_ADVICE = (
    ". `lookalike check -c {path} --repair` rebuilds it from settings.json, rows.sha256 and the files; where "
    "those are gone, index the folder again (`lookalike index ROOT -c {path} --rebuild`)"
)


def database_problem(database: Path) -> str | None:
    """What SQLite's own checks say is wrong with the database file (None: intact)."""
    try:
        connection = store.connect(database, readonly=True)
        try:
            problems = store.integrity_problems(connection)
            dangling = store.dangling_references(connection)
            store.read_settings(connection)
            store.all_images(connection)  # every record decodes and has its checksum
            store.all_contents(connection)
        finally:
            connection.close()
    except (sqlite3.Error, LookalikeError) as exc:
        return f"{database} cannot be read: {exc}"
    if problems:
        return f"{database} fails SQLite's integrity check: " + "; ".join(problems[:5])
    if dangling:
        return f"{database}: {dangling} rows refer to rows that do not exist"
    return None


def _check_parts(collection: Collection, report: CheckReport, repair: bool) -> None:
    _check_vectors(collection, report, repair)
    _check_whitening(collection, report, repair)
    _check_index(collection, report, repair)
    _check_files(collection, report)
    if repair:
        collection.index()  # fresh for the current generation, saved
        collection.neighbours.upkeep()  # and the kNN table and DBA, when the collection keeps them


# -- descriptors -----------------------------------------------------------------------------------------


def damaged_rows(collection: Collection) -> tuple[dict[int, str], list[int]]:
    """Content rows whose descriptor is missing, not finite, not unit-norm or not what was written
    (row → reason), and the rows that have no checksum recorded yet."""
    recorded = store.content_checksums(collection.db)
    present = collection.vectors.row_count()
    damaged: dict[int, str] = {row: "missing (the file is too short)" for row in recorded if row >= present}
    rows = np.array(sorted(row for row in recorded if row < present), dtype=np.int64)
    unrecorded = []
    for start in range(0, len(rows), CHUNK_ROWS):
        chunk = rows[start : start + CHUNK_ROWS]
        vectors = collection.vectors.read(chunk)
        for row, vector, crc in zip(chunk.tolist(), vectors, row_checksums(vectors), strict=True):
            reason = _row_problem(vector, crc, recorded[row])
            if reason is not None:
                damaged[row] = reason
            elif recorded[row] is None:
                unrecorded.append(row)
    return damaged, unrecorded


def _row_problem(vector: np.ndarray, crc: int, recorded: int | None) -> str | None:
    if not usable_descriptor(vector):
        return "all zero or not finite"
    with np.errstate(over="ignore"):
        norm = float(np.linalg.norm(vector.astype(np.float64)))
    if abs(norm - 1.0) > NORM_TOLERANCE:
        return "not unit-norm"
    if recorded is not None and crc != recorded:
        return "its checksum differs from the one recorded when it was written"
    return None


def _check_vectors(collection: Collection, report: CheckReport, repair: bool) -> None:
    expected = int(collection.settings["vector_rows"])
    present = collection.vectors.row_count()
    damaged, unrecorded = damaged_rows(collection)
    report.checked["descriptor rows"] = len(store.content_checksums(collection.db))
    if present < expected:
        report.findings.append(
            Finding("vectors", f"{collection.vectors.path.name} has {present} rows, the database records "
                    f"{expected} (truncated)",
                    repair=_extend(collection, expected) if repair else None)
        )  # fmt: skip
    if damaged:
        examples = ", ".join(f"row {row}: {why}" for row, why in list(damaged.items())[:3])
        restored, forgotten = _restore_rows(collection, damaged) if repair else ([], [])
        done = f"{len(restored)} rows re-extracted from their files" + (
            f"; {len(forgotten)} images forgotten (file gone or changed: `lookalike index` describes "
            "changed files again)"
            if forgotten
            else ""
        )
        report.findings.append(
            Finding("vectors", f"{len(damaged)} descriptor rows are damaged ({examples})",
                    repair=done if repair else None)
        )  # fmt: skip
    unchecked = store.unchecked_records(collection.db)
    if unchecked and repair:
        with _storage(collection), store.transaction(collection.db):
            store.set_record_checksums(collection.db, unchecked)
        report.findings.append(
            Finding("database", f"{len(unchecked)} image records had no checksum (written by an older "
                    "lookalike)", damage=False, repair="checksums recorded")
        )  # fmt: skip
    if unrecorded and repair:
        vectors = collection.vectors.read(np.array(unrecorded, dtype=np.int64))
        with _storage(collection), store.transaction(collection.db):
            store.set_content_checksums(
                collection.db, dict(zip(unrecorded, row_checksums(vectors), strict=True))
            )
        report.findings.append(
            Finding("vectors", f"{len(unrecorded)} rows had no checksum (written by an older lookalike)",
                    damage=False, repair="checksums recorded")
        )  # fmt: skip


def _storage(collection: Collection) -> AbstractContextManager[None]:
    return store.storage_errors(collection.path / DATABASE)


def _extend(collection: Collection, rows: int) -> str:
    """Give the file back its recorded length; the rows it lost are re-extracted as damaged rows."""
    collection.vectors.extend(rows)
    return f"file extended to {rows} rows"


def _restore_rows(collection: Collection, damaged: dict[int, str]) -> tuple[list[int], list[int]]:
    """Re-describe each damaged row from a file that still has its content; forget the images of rows no
    file can restore. Returns (restored rows, forgotten image ids)."""
    sources = dict(_intact_sources(collection, set(damaged)))
    described = collection.extractor.describe_files([path for path, _ in sources.values()])
    restored: dict[int, np.ndarray] = {}
    by_index = list(sources.items())
    for result in described:
        row, (_, sha256) = by_index[result.index]
        if result.vector is not None and result.sha256 == sha256 and usable_descriptor(result.vector):
            restored[row] = result.vector
    for row, vector in restored.items():
        collection.vectors.write(row, vector[None])
    lost = [row for row in damaged if row not in restored]
    forgotten = [r.id for r in collection.images().values() if r.row in lost]
    with _storage(collection), store.transaction(collection.db):
        store.set_content_checksums(
            collection.db, {row: row_checksums(vector[None])[0] for row, vector in restored.items()}
        )
        store.delete_images(collection.db, forgotten)
        store.bump_generation(collection.db)
    collection.refresh_settings()
    return sorted(restored), forgotten


def _intact_sources(collection: Collection, rows: set[int]) -> Iterator[tuple[int, tuple[Path, str]]]:
    """For each row, one indexed file whose current content still has the row's sha256."""
    found: set[int] = set()
    for record in collection.images().values():
        if record.row not in rows or record.row in found or record.sha256 is None:
            continue
        path = collection.absolute_path(record.path)
        try:
            if sha256_of_file(path) != record.sha256:
                continue
        except LookalikeError:
            continue
        found.add(record.row)
        yield record.row, (path, record.sha256)


# -- whitening, index, files ------------------------------------------------------------------------------


def _check_whitening(collection: Collection, report: CheckReport, repair: bool) -> None:
    kind = collection.settings.get("whitening")
    if kind is None:
        return
    try:
        collection.whitening  # noqa: B018 -- loading validates the file
        return
    except LookalikeError as exc:
        problem = f"{WHITENING} cannot be used: {exc}"
    action = None
    if repair:
        collection.set_whitening(None)
        action = f"whitening removed: fit it again with `lookalike whiten fit -c {collection.path}`"
    report.findings.append(Finding("whitening", problem, repair=action))


def index_problems(collection: Collection) -> list[str]:
    """Where the saved faiss index disagrees with the collection (empty: it agrees)."""
    try:
        meta = ann.read_meta(collection.path / INDEX_META)
    except (OSError, ValueError) as exc:
        return [f"{INDEX_META} is unreadable ({exc})"]
    if meta is None:
        return []  # never saved: built when first needed
    if any(meta.get(key) != value for key, value in collection.index_stamp.items()):
        return []  # stale, not damaged: rebuilt when next used
    problem = ann.index_problem(collection.path / INDEX, meta, collection.index_dim())
    if problem is not None:
        return [problem]
    index = ann.load_index(collection.path / INDEX, collection.index_spec)
    ids, raw = collection.raw_vectors()
    if index.ntotal != len(ids):
        return [f"it holds {index.ntotal} descriptors, the collection {len(ids)}"]
    return _sample_disagreements(index, ids, collection.prepare(raw) if len(raw) else raw)


def _sample_disagreements(index: ann.VectorIndex, ids: np.ndarray, xb: np.ndarray) -> list[str]:
    if not len(ids):
        return []
    rng = np.random.default_rng(0)
    sample = rng.choice(len(ids), min(SAMPLE_SEARCHES, len(ids)), replace=False)
    scores, found = ann.search(index, xb[sample], 1)
    own = np.einsum("ij,ij->i", xb[sample], xb[sample])
    wrong = int(np.sum(np.abs(scores[:, 0] - own) > 1e-4))
    missing = int(np.sum(~np.isin(found[:, 0], ids)))
    problems = []
    if wrong:
        problems.append(f"{wrong} of {len(sample)} sampled searches score differently from the descriptors")
    if missing:
        problems.append(
            f"{missing} of {len(sample)} sampled searches return ids the collection does not have"
        )
    return problems


def _check_index(collection: Collection, report: CheckReport, repair: bool) -> None:
    try:
        problems = index_problems(collection)
    except LookalikeError as exc:
        problems = [str(exc)]
    report.checked["index"] = 1
    if not problems:
        return
    action = None
    if repair:
        index = collection.build_index()
        collection.save_index(index)
        action = f"rebuilt from the descriptors ({index.ntotal} vectors)"
    report.findings.append(Finding("index", f"{INDEX}: " + "; ".join(problems), repair=action))


def _check_files(collection: Collection, report: CheckReport) -> None:
    missing, changed = [], []
    records = collection.images()
    for name, record in records.items():
        try:
            status = collection.absolute_path(name).stat()
        except OSError:
            missing.append(name)
            continue
        if (status.st_size, status.st_mtime_ns) != (record.size, record.mtime_ns):
            changed.append(name)
    report.checked["files"] = len(records)
    for kind, names in (("missing", missing), ("changed", changed)):
        if names:
            shown = ", ".join(names[:3]) + (" …" if len(names) > 3 else "")
            report.findings.append(
                Finding("files", f"{len(names)} indexed files are {kind} since indexing ({shown}); "
                        "`lookalike index` brings the collection up to date", damage=False)
            )  # fmt: skip


# -- a lost database ---------------------------------------------------------------------------------------


def rebuild_database(path: Path) -> str:
    """Replace a lost or damaged database from the mirror, the row hashes and the files under the root
    (see :mod:`lookalike.collection.recovery`). Returns what was done; raises CollectionError when there is
    nothing to rebuild from."""
    mirrored = recovery.read_mirror(path)
    if mirrored is None or not mirrored.get("root"):
        raise CollectionError(f"{path}/{SETTINGS_MIRROR} is missing or unreadable: nothing to rebuild from")
    aside = _move_aside(path, DATABASE)
    for derived in DERIVED:
        (path / derived).unlink(missing_ok=True)
    vectors = VectorFile(path / VECTORS, int(mirrored["dim"]))
    hashes = recovery.RowHashes(path / ROW_HASHES).read()[: vectors.row_count()]
    connection = store.connect(path / DATABASE)
    try:
        store.migrate(connection)
        with store.transaction(connection):
            store.write_settings(
                connection,
                {**mirrored, "vector_rows": vectors.row_count(), "generation": 0, "whitening": None},
            )
            taken = _take_back_rows(connection, vectors, hashes)
    finally:
        connection.close()
    with Collection.open(path) as collection:
        report = collection.sync(commit_every=2**62)  # one commit: taken-back rows no file names yet stay
        if mirrored.get("whitening") and (path / WHITENING).exists():
            collection._write_settings({"whitening": mirrored["whitening"]})
    return (
        f"database rebuilt (the damaged one kept as {aside.name}): {taken} descriptors taken back by content "
        f"hash, {report.indexed} images described again, {len(report.failed)} unreadable; image ids are new"
    )


def _take_back_rows(connection: sqlite3.Connection, vectors: VectorFile, hashes: list[str]) -> int:
    latest: dict[str, int] = {}
    for row, sha in enumerate(hashes):
        if sha != "00" * recovery.HASH_BYTES:
            latest[sha] = row  # a content indexed again after removal: its newest row
    if not latest:
        return 0
    rows = np.array(sorted(latest.values()), dtype=np.int64)
    stored = vectors.read(rows)
    taken = 0
    for row, vector, crc in zip(rows.tolist(), stored, row_checksums(stored), strict=True):
        if _row_problem(vector, 0, None) is None:
            store.add_content(connection, row, hashes[row], crc)
            taken += 1
    return taken


def _move_aside(path: Path, name: str) -> Path:
    aside = path / f"{name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ("", "-wal", "-shm"):
        source = path / f"{name}{suffix}"
        if source.exists():
            replace(source, Path(f"{aside}{suffix}"))
    return aside
