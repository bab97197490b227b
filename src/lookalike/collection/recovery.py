"""What lets a collection whose database is lost or damaged be rebuilt without re-describing every image.

Two small files beside the database, each written before the database commits what they describe:

- ``settings.json``: the descriptor identity and root (what the database's settings hold, minus counters),
  rewritten atomically whenever one of them changes;
- ``rows.sha256``: the 32-byte sha256 of the content each descriptor row was made from, at ``row · 32``,
  written and fsynced with the rows themselves.

``rebuild_database`` moves the damaged database aside, creates a new one from ``settings.json``, takes back
every descriptor row whose content's sha256 is known and whose vector is intact, and indexes the root again:
files whose content has a row are matched by hash (no decoding), only the rest are described anew.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.atomic import atomic_write
from lookalike.errors import CollectionError

SETTINGS_MIRROR, ROW_HASHES = "settings.json", "rows.sha256"
MIRRORED_KEYS = (
    "model",
    "weights_sha256",
    "pooling",
    "gem_p",
    "imsize",
    "scales",
    "dim",
    "root",
    "whitening",
)
HASH_BYTES = 32


def write_mirror(path: Path, settings: dict[str, Any]) -> None:
    """Keep ``settings.json`` equal to the database's identity settings (atomically)."""
    mirrored = {key: settings.get(key) for key in MIRRORED_KEYS}
    try:
        if json.loads((path / SETTINGS_MIRROR).read_text()) == mirrored:
            return
    except (OSError, ValueError):
        pass
    with atomic_write(path / SETTINGS_MIRROR, "w") as handle:
        json.dump(mirrored, handle, indent=1)


def read_mirror(path: Path) -> dict[str, Any] | None:
    try:
        mirrored = json.loads((path / SETTINGS_MIRROR).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(mirrored, dict) or any(key not in mirrored for key in MIRRORED_KEYS):
        return None
    return mirrored


class RowHashes:
    """``rows.sha256``: the content hash of each descriptor row, fixed-size records like the vector file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, start_row: int, sha256s: list[str]) -> None:
        if not sha256s:
            return
        data = b"".join(bytes.fromhex(sha) for sha in sha256s)
        try:
            descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            try:
                os.pwrite(descriptor, data, start_row * HASH_BYTES)
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        except OSError as exc:
            raise CollectionError(
                f"cannot write {self.path}: {exc.strerror or exc}; nothing of this step was committed. Free "
                "some space and run the command again: it resumes"
            ) from exc

    def read(self) -> list[str]:
        try:
            data = self.path.read_bytes()
        except OSError:
            return []
        return [data[i : i + HASH_BYTES].hex() for i in range(0, len(data) - HASH_BYTES + 1, HASH_BYTES)]


def rebuild_database(path: Path, usable: Any) -> str:
    """Replace a lost or damaged database from the mirror, the row hashes and the files under the root.

    ``usable(vector) -> bool`` says whether a stored row can be taken back. Returns what was done; raises
    CollectionError when there is nothing to rebuild from.
    """
    from lookalike.collection import store
    from lookalike.collection.collection import DATABASE, INDEX, INDEX_META, VECTORS, Collection
    from lookalike.collection.vectors import VectorFile, row_checksums

    mirrored = read_mirror(path)
    if mirrored is None or not mirrored.get("root"):
        raise CollectionError(f"{path}/{SETTINGS_MIRROR} is missing or unreadable: nothing to rebuild from")
    aside = _move_aside(path, DATABASE)
    for derived in (INDEX, INDEX_META):
        (path / derived).unlink(missing_ok=True)
    vectors = VectorFile(path / VECTORS, int(mirrored["dim"]))
    hashes = RowHashes(path / ROW_HASHES).read()[: vectors.row_count()]
    connection = store.connect(path / DATABASE)
    try:
        store.migrate(connection)
        with store.transaction(connection):
            store.write_settings(
                connection,
                {**mirrored, "vector_rows": vectors.row_count(), "generation": 0, "whitening": None},
            )
            taken = _take_back_rows(connection, vectors, hashes, usable, row_checksums)
    finally:
        connection.close()
    with Collection.open(path) as collection:
        report = collection.sync(commit_every=2**62)  # one commit: taken-back rows no file names yet stay
        if mirrored.get("whitening") and (path / "whitening.npz").exists():
            collection._write_settings({"whitening": mirrored["whitening"]})
    return (
        f"database rebuilt (the damaged one kept as {aside.name}): {taken} descriptors taken back by content "
        f"hash, {report.indexed} images described again, {len(report.failed)} unreadable; image ids are new"
    )


def _take_back_rows(connection: Any, vectors: Any, hashes: list[str], usable: Any, checksums: Any) -> int:
    from lookalike.collection import store

    latest: dict[str, int] = {}
    for row, sha in enumerate(hashes):
        if sha != "00" * HASH_BYTES:
            latest[sha] = row  # a content indexed again after removal: its newest row
    if not latest:
        return 0
    rows = np.array(sorted(latest.values()), dtype=np.int64)
    stored = vectors.read(rows)
    taken = 0
    for row, vector, crc in zip(rows.tolist(), stored, checksums(stored), strict=True):
        if usable(vector):
            store.add_content(connection, row, hashes[row], crc)
            taken += 1
    return taken


def _move_aside(path: Path, name: str) -> Path:
    aside = path / f"{name}.damaged-{time.strftime('%Y%m%d-%H%M%S')}"
    for suffix in ("", "-wal", "-shm"):
        source = path / f"{name}{suffix}"
        if source.exists():
            os.replace(source, Path(f"{aside}{suffix}"))
    return aside
