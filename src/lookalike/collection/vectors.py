"""The descriptor file: raw little-endian float32 rows of a fixed dimension, memory-mapped for reading.

Row ``r`` lives at byte ``r · dim · 4``. Rows are written before the database commits the rows that refer to
them, and never reused, so a reader that follows the database never sees a half-written or recycled row.
Each row's crc32 is recorded with it in the database, so damage on disk is found (``lookalike check``).
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import numpy as np

from lookalike.atomic import write_at
from lookalike.errors import CollectionError, DamagedCollectionError


def row_checksums(rows: np.ndarray) -> list[int]:
    """The crc32 of each row's little-endian float32 bytes, as written to the file."""
    rows = np.ascontiguousarray(rows, dtype="<f4")
    return [zlib.crc32(row.tobytes()) for row in rows]


def write_records(path: Path, data: bytes, offset: int) -> None:
    """Write fixed-size records durably at ``offset`` (see :func:`lookalike.atomic.write_at`), before the
    database commits anything that refers to them; a failure is a CollectionError that says the way out."""
    try:
        write_at(path, data, offset)
    except OSError as exc:
        raise CollectionError(
            f"cannot write {path}: {exc.strerror or exc}; nothing of this step was committed. Free some "
            "space (or fix the folder's permissions) and run the command again: it resumes"
        ) from exc


class VectorFile:
    def __init__(self, path: Path, dim: int) -> None:
        self.path = path
        self.dim = dim
        self.row_bytes = dim * 4

    def row_count(self) -> int:
        try:
            return self.path.stat().st_size // self.row_bytes
        except FileNotFoundError:
            return 0

    def require_rows(self, rows: int) -> None:
        """Refuse a file shorter than the ``rows`` the database records (truncated or replaced on disk)."""
        found = self.row_count()
        if found < rows:
            raise DamagedCollectionError(
                f"{self.path} holds {found} descriptor rows but the collection records {rows}: the file was "
                f"truncated. Run `lookalike check -c {self.path.parent} --repair` to re-extract what is missing"
            )

    def write(self, start_row: int, rows: np.ndarray) -> None:
        """Write ``rows`` (R, dim) at ``start_row`` and fsync, so they are durable before any commit."""
        rows = np.ascontiguousarray(rows, dtype="<f4")
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise CollectionError(f"descriptors of shape {rows.shape} do not fit a {self.dim}-D collection")
        write_records(self.path, rows.tobytes(), start_row * self.row_bytes)

    def extend(self, rows: int) -> None:
        """Give a truncated (or lost) file back the length of ``rows`` rows; the lost rows read as zeros."""
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(descriptor, rows * self.row_bytes)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def truncate(self, rows: int) -> None:
        """Drop rows past ``rows`` (left by a run that was killed before its commit); a file with fewer
        rows than that is damaged and refused."""
        self.require_rows(rows)
        if self.row_count() > rows or self._size() % self.row_bytes:
            os.truncate(self.path, rows * self.row_bytes)

    def _size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def read(self, rows: np.ndarray | None = None) -> np.ndarray:
        """All rows (a read-only memory map), or a copy of the rows at the given indices."""
        count = self.row_count()
        if count == 0:
            matrix = np.zeros((0, self.dim), np.float32)
        else:
            matrix = np.memmap(self.path, dtype="<f4", mode="r", shape=(count, self.dim))
        if rows is None:
            return matrix
        if len(rows) and int(np.max(rows)) >= count:
            raise DamagedCollectionError(
                f"{self.path}: row {int(np.max(rows))} is missing (file has {count} rows). Run "
                f"`lookalike check -c {self.path.parent} --repair`"
            )
        return np.array(matrix[rows], dtype=np.float32)
