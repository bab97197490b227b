"""The files of a collection directory, and the one lock that lets a single process write them.

Layout of a collection directory::

    collection.sqlite   images, contents, settings (schema version in PRAGMA user_version)
    vectors.f32         raw descriptors, one float32 row per distinct content (see vectors.py)
    index.faiss         the vector index of the (whitened) descriptors, ids = image ids; rebuilt when stale
    index.json          the database generation and whitening the index was built from, and its checksum
    whitening.npz       optional whitening applied on top of the raw descriptors
    neighbours.npz      each indexed image's K nearest others (see neighbours.py); updated or rebuilt when stale
    dba.npz             the indexed vectors after database-side augmentation, made from neighbours.npz
    settings.json       the identity settings, mirrored for rebuilding a lost database (see recovery.py)
    rows.sha256         the content hash of each descriptor row (see recovery.py)
    write.lock          held (flock) by the one process that writes
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

from lookalike.atomic import exclusive_lock
from lookalike.errors import CollectionBusyError

DATABASE, VECTORS, INDEX, INDEX_META, WHITENING, LOCK = (
    "collection.sqlite",
    "vectors.f32",
    "index.faiss",
    "index.json",
    "whitening.npz",
    "write.lock",
)
SETTINGS_MIRROR, ROW_HASHES = "settings.json", "rows.sha256"
NEIGHBOURS, AUGMENTED = "neighbours.npz", "dba.npz"
DERIVED = (INDEX, INDEX_META, NEIGHBOURS, AUGMENTED)  # made from the rest; rebuilt when missing or stale
REBUILT = (DATABASE, f"{DATABASE}-wal", f"{DATABASE}-shm", VECTORS, WHITENING, *DERIVED)  # --rebuild


def write_lock(path: Path) -> AbstractContextManager[int]:
    """The collection's one-writer lock (``flock`` on ``write.lock``), held for the block or refused."""
    return exclusive_lock(path / LOCK, CollectionBusyError(f"{path} is being written by another process"))
