"""The file-system primitives the library writes through: whole files replaced atomically, records written
in place durably, and the one exclusive lock that keeps a second writer out."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO

import numpy as np


def replace(source: str | Path, target: str | Path) -> None:
    """Rename ``source`` over ``target``, then fsync the folder so the rename itself survives a crash
    (best effort: a file system that cannot fsync a folder keeps the rename all the same)."""
    os.replace(source, target)
    with suppress(OSError):
        folder = os.open(Path(target).parent, os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)


@contextmanager
def atomic_write(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Write through the yielded handle; the target appears complete or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(mode, dir=path.parent, prefix=f".{path.name}.", delete=False)  # noqa: SIM115
    try:
        with handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def write_at(path: str | Path, data: bytes, offset: int) -> None:
    """Write ``data`` at byte ``offset`` of ``path`` (created when missing) and fsync, so it is durable
    before anything that refers to it is committed. A write that makes no progress is a full disk."""
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        remaining = memoryview(data)
        while remaining:
            written = os.pwrite(descriptor, remaining, offset)
            if written == 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            remaining, offset = remaining[written:], offset + written
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


@contextmanager
def exclusive_lock(path: str | Path, busy: Exception) -> Iterator[int]:
    """Hold an exclusive ``flock`` on ``path`` (created when missing) for the block, or raise ``busy`` at once
    when another process holds it. The lock goes with the process: a killed holder leaves no stale lock."""
    handle = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise busy from None
        yield handle
    finally:
        os.close(handle)


def file_stamp(path: str | Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten: inode, mtime and size (None: no file)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file's content."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def save_npz_atomic(path: str | Path, **arrays: np.ndarray) -> None:
    """``np.savez`` of plain (non-object) arrays, atomically."""
    for name, array in arrays.items():
        if np.asarray(array).dtype == object:
            raise ValueError(f"array {name!r} has dtype object; only plain arrays are saved")
    with atomic_write(path) as handle:
        np.savez(handle, **arrays)  # type: ignore[arg-type]
