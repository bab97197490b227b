"""The collection's SQLite metadata: schema version, numbered migrations, and every statement the rest of
the collection runs, each behind a named function (no SQL is written anywhere else).

One row per image file (path relative to the indexed root) and one row per distinct content (sha256) that
owns a row of the vector file, so identical files are described and stored once.
"""

from __future__ import annotations

import json
import logging
import shutil
import sqlite3
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import astuple, dataclass, fields, replace
from pathlib import Path
from typing import Any

from lookalike.collection.layout import DATABASE as DATABASE
from lookalike.errors import CollectionError, DamagedCollectionError

log = logging.getLogger(__name__)

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
    CREATE TABLE contents (
        row INTEGER PRIMARY KEY,
        sha256 TEXT NOT NULL UNIQUE
    );
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        path TEXT NOT NULL UNIQUE,
        size INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        sha256 TEXT,
        width INTEGER,
        height INTEGER,
        status TEXT NOT NULL CHECK (status IN ('ok', 'failed')),
        error TEXT,
        row INTEGER REFERENCES contents(row)
    );
    CREATE INDEX images_sha256 ON images(sha256);
    CREATE INDEX images_row ON images(row);
    """,
    # A checksum of each descriptor row as written, so `lookalike check` finds rows damaged on disk.
    "ALTER TABLE contents ADD COLUMN crc32 INTEGER",
    # A checksum of each image record, so a record damaged on disk is an error, never another file's result.
    "ALTER TABLE images ADD COLUMN checksum INTEGER",
    # The index type is recorded (collections made before it have the exact flat index).
    """INSERT OR IGNORE INTO settings(key, value) VALUES ('index', '{"type": "flat", "params": {}}')""",
    # Local features (spatial verification) per content and describer identity, in their compact form
    # (lookalike.local.features); they go with their content.
    """
    CREATE TABLE local_features (
        sha256 TEXT NOT NULL REFERENCES contents(sha256) ON DELETE CASCADE,
        identity TEXT NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (sha256, identity)
    ) WITHOUT ROWID;
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


@dataclass(frozen=True)
class ImageRecord:
    """One image file as the collection records it: its name (relative to the root when under it), size and
    mtime when indexed, the sha256 of its content, and that content's descriptor row (None when it could not
    be described: ``status`` is then ``failed`` and ``error`` says why)."""

    id: int
    path: str
    size: int
    mtime_ns: int
    sha256: str | None
    width: int | None
    height: int | None
    status: str
    error: str | None
    row: int | None


UNASSIGNED_ID = 0  # ids start at 1: the id of a record not yet written, which ``record_image`` assigns
IMAGE_COLUMNS = ", ".join(f.name for f in fields(ImageRecord))
CHECKED_COLUMNS = IMAGE_COLUMNS + ", checksum"
MAX_ID = 2**63 - 1  # SQLite integers are signed 64-bit


def storage_error(exc: sqlite3.Error, database: Path | str) -> CollectionError:
    """A SQLite failure as one line that names the problem and the way out."""
    text = str(exc)
    if isinstance(exc, sqlite3.OperationalError):
        if "full" in text or ("I/O error" in text and _disk_nearly_full(Path(database).parent)):
            text = text if "full" in text else f"{text}: the disk is full"
            return CollectionError(
                f"{database}: {text}; nothing of the failed step was committed. Free some space and run "
                "the command again: it resumes where it stopped"
            )
        if "locked" in text or "busy" in text:
            return CollectionError(f"{database}: {text}; another process holds it, try again when it is done")
        if "I/O error" in text:
            return CollectionError(
                f"{database}: {text} ({getattr(exc, 'sqlite_errorname', 'I/O')}); nothing of the failed step "
                "was committed. Check the disk, then run the command again: it resumes where it stopped"
            )
        if "malformed" not in text:
            return CollectionError(f"{database}: {text}")
    return CollectionError(
        f"{database} is damaged ({text}). Run `lookalike check -c {Path(database).parent}` to see what can "
        "be saved"
    )


@contextmanager
def storage_errors(database: Path) -> Iterator[None]:
    """SQLite failures inside the block as the CollectionError of :func:`storage_error`."""
    try:
        yield
    except sqlite3.Error as exc:
        raise storage_error(exc, database) from exc


def _disk_nearly_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < 1 << 20
    except OSError:
        return False


@contextmanager
def transaction(connection: sqlite3.Connection) -> Iterator[None]:
    """``BEGIN IMMEDIATE`` … ``COMMIT``; on any failure a rollback that never hides the first error."""
    connection.execute("BEGIN IMMEDIATE")
    try:
        yield
        connection.execute("COMMIT")
    except BaseException:
        if connection.in_transaction:
            # SQLite may have rolled back already (e.g. after a full disk); the first error is the news.
            with suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
        raise


def connect(path: Path, readonly: bool = False) -> sqlite3.Connection:
    """A connection in WAL mode (readers never block the writer) with foreign keys on."""
    if readonly:
        connection = _read_only(path)
    else:
        connection = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=ON")
    return connection


def _read_only(path: Path) -> sqlite3.Connection:
    """A read-only connection. A WAL reader needs room for its shared-memory file; on a full disk, with no
    write-ahead log left to read, the database file alone is the whole committed state and is opened as is."""
    uri = f"{Path(path).absolute().as_uri()}?mode=ro"  # percent-encoded: '#', '?', '%' are literal
    connection = sqlite3.connect(uri, uri=True, timeout=30, isolation_level=None, check_same_thread=False)
    try:
        connection.execute("SELECT COUNT(*) FROM sqlite_master").fetchone()
        return connection
    except sqlite3.OperationalError:
        wal = Path(f"{path}-wal")
        if (wal.exists() and wal.stat().st_size > 0) or not _disk_nearly_full(Path(path).parent):
            raise
    connection.close()
    log.warning("%s: the disk is full; reading the database without its shared-memory file", path)
    return sqlite3.connect(f"{uri}&immutable=1", uri=True, isolation_level=None, check_same_thread=False)


def schema_version(connection: sqlite3.Connection) -> int:
    return int(connection.execute("PRAGMA user_version").fetchone()[0])


def refuse_newer(version: int) -> None:
    if version > SCHEMA_VERSION:
        raise CollectionError(
            f"collection schema version {version} is newer than this lookalike ({SCHEMA_VERSION}); upgrade lookalike"
        )


def migrate(connection: sqlite3.Connection) -> None:
    """Apply the numbered migrations this database has not seen, each in its own transaction."""
    version = schema_version(connection)
    refuse_newer(version)
    for number in range(version, SCHEMA_VERSION):
        with transaction(connection):
            _run_script(connection, MIGRATIONS[number])
            connection.execute(f"PRAGMA user_version = {number + 1}")


def _run_script(connection: sqlite3.Connection, script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            connection.execute(statement)


def read_settings(connection: sqlite3.Connection) -> dict[str, Any]:
    return {key: json.loads(value) for key, value in connection.execute("SELECT key, value FROM settings")}


def write_settings(connection: sqlite3.Connection, settings: dict[str, object]) -> None:
    connection.executemany(
        "INSERT INTO settings(key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [(key, json.dumps(value)) for key, value in settings.items()],
    )


def record_checksum(values: tuple) -> int:
    """crc32 of an image record's fields (id … row), as written; SQLite keeps no checksums of its own."""
    return zlib.crc32(json.dumps(list(values), ensure_ascii=False).encode())


def _record(row: tuple) -> ImageRecord:
    *values, checksum = row
    if checksum is not None and checksum != record_checksum(tuple(values)):
        raise DamagedCollectionError(
            f"the database record of image {values[0]} is damaged on disk (its checksum differs). Run "
            "`lookalike check -c COLLECTION --repair` to rebuild the database"
        )
    return ImageRecord(*values)


def all_images(connection: sqlite3.Connection) -> dict[str, ImageRecord]:
    rows = connection.execute(f"SELECT {CHECKED_COLUMNS} FROM images")
    return {record.path: record for record in map(_record, rows)}


def images_by_ids(connection: sqlite3.Connection, ids: Iterable[int]) -> dict[int, ImageRecord]:
    """Records of the given ids that exist; ids no image can have (outside 1..2⁶³−1) are simply absent."""
    wanted = [int(i) for i in ids if 1 <= int(i) <= MAX_ID]
    found: dict[int, ImageRecord] = {}
    for start in range(0, len(wanted), 500):
        chunk = wanted[start : start + 500]
        marks = ",".join("?" * len(chunk))
        for row in connection.execute(f"SELECT {CHECKED_COLUMNS} FROM images WHERE id IN ({marks})", chunk):
            found[row[0]] = _record(row)
    return found


def image_by_path(connection: sqlite3.Connection, path: str) -> ImageRecord | None:
    row = connection.execute(f"SELECT {CHECKED_COLUMNS} FROM images WHERE path = ?", (path,)).fetchone()
    return _record(row) if row else None


def indexed_rows(connection: sqlite3.Connection) -> list[tuple[int, int]]:
    """(image id, vector row) of every image that has a descriptor, by id, read in one transaction."""
    connection.execute("BEGIN")
    try:
        rows = connection.execute(f"SELECT {CHECKED_COLUMNS} FROM images WHERE status = 'ok' ORDER BY id")
        return [(record.id, record.row) for record in map(_record, rows)]  # type: ignore[misc]
    finally:
        connection.execute("COMMIT")


def indexed_keys(connection: sqlite3.Connection) -> tuple[list[tuple[int, int, int | None]], int]:
    """(image id, vector row, that row's crc32) of every image that has a descriptor, by id, and the
    generation they belong to, read in one transaction."""
    connection.execute("BEGIN")
    try:
        rows = connection.execute(f"SELECT {CHECKED_COLUMNS} FROM images WHERE status = 'ok' ORDER BY id")
        pairs = [(record.id, record.row) for record in map(_record, rows)]
        crcs = dict(connection.execute("SELECT row, crc32 FROM contents"))
        found = connection.execute("SELECT value FROM settings WHERE key = 'generation'").fetchone()
    finally:
        connection.execute("COMMIT")
    generation = json.loads(found[0]) if found else 0
    return [(i, row, crcs.get(row)) for i, row in pairs if row is not None], generation


def content_checksums(connection: sqlite3.Connection, rows: list[int] | None = None) -> dict[int, int | None]:
    """The crc32 recorded for each content row, or for the given ones (None: written before checksums were
    recorded)."""
    if rows is None:
        return {int(row): crc for row, crc in connection.execute("SELECT row, crc32 FROM contents")}
    found: dict[int, int | None] = {}
    for start in range(0, len(rows), 500):
        chunk = rows[start : start + 500]
        marks = ",".join("?" * len(chunk))
        found.update(connection.execute(f"SELECT row, crc32 FROM contents WHERE row IN ({marks})", chunk))
    return found


def set_content_checksums(connection: sqlite3.Connection, checksums: dict[int, int]) -> None:
    connection.executemany(
        "UPDATE contents SET crc32 = ? WHERE row = ?", [(crc, row) for row, crc in checksums.items()]
    )


def content_row(connection: sqlite3.Connection, sha256: str) -> int | None:
    row = connection.execute("SELECT row FROM contents WHERE sha256 = ?", (sha256,)).fetchone()
    return int(row[0]) if row else None


def content_size(connection: sqlite3.Connection, row: int) -> tuple[int, int] | None:
    """(width, height) recorded for a content row by any image holding it."""
    found = connection.execute(
        "SELECT width, height FROM images WHERE row = ? AND width IS NOT NULL LIMIT 1", (row,)
    ).fetchone()
    return (int(found[0]), int(found[1])) if found else None


def next_row(connection: sqlite3.Connection) -> int:
    return int(connection.execute("SELECT COALESCE(MAX(row) + 1, 0) FROM contents").fetchone()[0])


def next_image_id(connection: sqlite3.Connection) -> int:
    return int(connection.execute("SELECT COALESCE(MAX(id) + 1, 1) FROM images").fetchone()[0])


def bump_generation(connection: sqlite3.Connection) -> int:
    """Count one more change to what the index holds (in the caller's transaction); returns the new count."""
    row = connection.execute("SELECT value FROM settings WHERE key = 'generation'").fetchone()
    generation = (json.loads(row[0]) if row else 0) + 1
    write_settings(connection, {"generation": generation})
    return generation


def counts(connection: sqlite3.Connection) -> dict[str, int]:
    result = {"ok": 0, "failed": 0}
    for status, count in connection.execute("SELECT status, COUNT(*) FROM images GROUP BY status"):
        result[status] = count
    result["contents"] = int(connection.execute("SELECT COUNT(*) FROM contents").fetchone()[0])
    return result


def add_content(connection: sqlite3.Connection, row: int, sha256: str, crc32: int) -> None:
    connection.execute("INSERT INTO contents(row, sha256, crc32) VALUES (?, ?, ?)", (row, sha256, crc32))


def record_image(connection: sqlite3.Connection, image: ImageRecord, next_id: int) -> int:
    """Insert or replace the record of ``image.path``: a known path keeps its id, a new one gets ``next_id``
    (``image.id`` is not read; pass ``UNASSIGNED_ID``). Returns the next free id."""
    existing = connection.execute("SELECT id FROM images WHERE path = ?", (image.path,)).fetchone()
    values = astuple(replace(image, id=existing[0] if existing else next_id))
    connection.execute(
        f"INSERT OR REPLACE INTO images({CHECKED_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        (*values, record_checksum(values)),
    )
    return next_id if existing else next_id + 1


def unchecked_records(connection: sqlite3.Connection) -> list[tuple]:
    """Image records written before record checksums existed."""
    return connection.execute(f"SELECT {IMAGE_COLUMNS} FROM images WHERE checksum IS NULL").fetchall()


def set_record_checksums(connection: sqlite3.Connection, records: list[tuple]) -> None:
    connection.executemany(
        "UPDATE images SET checksum = ? WHERE id = ?", [(record_checksum(tuple(r)), r[0]) for r in records]
    )


def delete_orphan_contents(connection: sqlite3.Connection) -> None:
    connection.execute("DELETE FROM contents WHERE row NOT IN (SELECT row FROM images WHERE row IS NOT NULL)")


def delete_images(connection: sqlite3.Connection, ids: Iterable[int]) -> None:
    """Delete images, then every content row no image refers to any more."""
    connection.executemany("DELETE FROM images WHERE id = ?", [(i,) for i in ids])
    delete_orphan_contents(connection)


def integrity_problems(connection: sqlite3.Connection, most: int = 20) -> list[str]:
    """What SQLite's ``integrity_check`` finds (at most ``most`` lines; empty: intact)."""
    found = [row[0] for row in connection.execute(f"PRAGMA integrity_check({int(most)})")]
    return [] if found == ["ok"] else found


def dangling_references(connection: sqlite3.Connection) -> int:
    """How many rows refer to rows that do not exist (SQLite's ``foreign_key_check``)."""
    return len(connection.execute("PRAGMA foreign_key_check").fetchall())


def all_contents(connection: sqlite3.Connection) -> list[tuple[int, str, int | None]]:
    """(row, sha256, crc32) of every content."""
    return connection.execute("SELECT row, sha256, crc32 FROM contents").fetchall()


def local_features_of(connection: sqlite3.Connection, sha256s: list[str], identity: str) -> dict[str, bytes]:
    """The stored local features of these contents made by ``identity`` (absent ones are left out)."""
    found: dict[str, bytes] = {}
    for start in range(0, len(sha256s), 500):
        chunk = sha256s[start : start + 500]
        marks = ", ".join("?" * len(chunk))
        found.update(
            connection.execute(
                f"SELECT sha256, data FROM local_features WHERE identity = ? AND sha256 IN ({marks})",
                (identity, *chunk),
            ).fetchall()
        )
    return found


def add_local_features(connection: sqlite3.Connection, identity: str, items: dict[str, bytes]) -> None:
    """Store local features of contents that exist (a content removed meanwhile is skipped)."""
    connection.executemany(
        "INSERT OR REPLACE INTO local_features(sha256, identity, data) "
        "SELECT ?, ?, ? WHERE EXISTS (SELECT 1 FROM contents WHERE sha256 = ?)",
        [(sha, identity, data, sha) for sha, data in items.items()],
    )


def local_feature_counts(connection: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Per describer identity: how many contents have stored local features, and their bytes."""
    rows = connection.execute(
        "SELECT identity, COUNT(*), COALESCE(SUM(LENGTH(data)), 0) FROM local_features GROUP BY identity"
    )
    return {identity: (int(count), int(size)) for identity, count, size in rows}


def contents_without_local_features(connection: sqlite3.Connection, identity: str) -> list[tuple]:
    """(sha256, path, size, mtime_ns) of one image of each content that has no local features of
    ``identity`` yet."""
    return connection.execute(
        "SELECT c.sha256, MIN(i.path), i.size, i.mtime_ns FROM contents c JOIN images i ON i.row = c.row "
        "WHERE NOT EXISTS (SELECT 1 FROM local_features f WHERE f.sha256 = c.sha256 AND f.identity = ?) "
        "GROUP BY c.sha256",
        (identity,),
    ).fetchall()
