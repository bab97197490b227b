"""The descriptor file: raw little-endian float32 rows of a fixed dimension, memory-mapped for reading.

Row ``r`` lives at byte ``r · dim · 4``. Rows are written before the database commits the rows that refer to
them, and never reused, so a reader that follows the database never sees a half-written or recycled row.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from lookalike.errors import CollectionError


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

    def write(self, start_row: int, rows: np.ndarray) -> None:
        """Write ``rows`` (R, dim) at ``start_row`` and fsync, so they are durable before any commit."""
        rows = np.ascontiguousarray(rows, dtype="<f4")
        if rows.ndim != 2 or rows.shape[1] != self.dim:
            raise CollectionError(f"descriptors of shape {rows.shape} do not fit a {self.dim}-D collection")
        descriptor = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.pwrite(descriptor, rows.tobytes(), start_row * self.row_bytes)
            os.fsync(descriptor)
        finally:
            os.close(descriptor)

    def truncate(self, rows: int) -> None:
        """Drop rows past ``rows`` (left by a run that was killed before its commit)."""
        if self.row_count() > rows:
            os.truncate(self.path, rows * self.row_bytes)

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
            raise CollectionError(f"{self.path}: row {int(np.max(rows))} is missing (file has {count} rows)")
        return np.array(matrix[rows], dtype=np.float32)
