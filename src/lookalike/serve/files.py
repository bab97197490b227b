"""Indexed image files as the server sends them: opened only when they are still what was indexed, their
content type, JPEG thumbnails made once, and a response that streams the very descriptor that was checked.

A file is served (original, thumbnail, or a crop to search with) only when, at the moment it is opened:

- its fully resolved path lies inside its folder — the collection's root, or for a file indexed outside
  the root the folder it was indexed in — so a symlink swapped in for a photo (``ln -sf /etc/passwd
  pic.webp``) is refused; the check is made again on the opened descriptor (Linux ``/proc/self/fd``), so a
  folder swapped for a symlink between the check and the open is refused too;
- it is a regular file: the open is non-blocking and never follows a final symlink (``O_NOFOLLOW``), and the
  type is checked on the opened descriptor, so a FIFO swapped in never blocks a thread, a device is refused;
- it is the file that was indexed: the same size, and the same modification time or else the same sha256.

Thumbnails live in the collection folder under ``thumbs/``, named by the content's sha256 and the size
(``thumbs/ab/ab12…-256.jpg``), so identical files share one and a changed file gets a new one. Each is
written to a temporary file and renamed into place: a reader never sees half a thumbnail.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import mimetypes
import os
import stat
import threading
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import anyio
from PIL import Image
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from lookalike.atomic import atomic_write
from lookalike.collection.store import ImageRecord
from lookalike.images import load_image_bytes
from lookalike.serve.errors import ApiError

log = logging.getLogger(__name__)

THUMBS = "thumbs"
CHUNK = 256 * 1024
OPEN_FLAGS = os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


@dataclass
class OpenedFile:
    """An indexed image's file, open read-only and checked (see the module's docstring); close it."""

    descriptor: int
    size: int
    name: str

    def read(self) -> bytes:
        """The whole content as it was checked (``size`` bytes at most), whatever the file offset."""
        parts, offset = [], 0
        while offset < self.size and (
            part := os.pread(self.descriptor, min(CHUNK, self.size - offset), offset)
        ):
            parts.append(part)
            offset += len(part)
        return b"".join(parts)

    def sha256(self) -> str:
        digest, offset = hashlib.sha256(), 0
        while part := os.pread(self.descriptor, CHUNK, offset):
            digest.update(part)
            offset += len(part)
        return digest.hexdigest()

    def close(self) -> None:
        if self.descriptor >= 0:
            os.close(self.descriptor)
            self.descriptor = -1


class Rehashed:
    """The files whose sha256 was found to match their record although their mtime did not (a file touched,
    copied back), by (id, device, inode, size, mtime): each is hashed once, not on every request."""

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._stamps: set[tuple[int, ...]] = set()
        self._lock = threading.Lock()

    def __contains__(self, stamp: tuple[int, ...]) -> bool:
        return stamp in self._stamps

    def add(self, stamp: tuple[int, ...]) -> None:
        with self._lock:
            if len(self._stamps) >= self.limit:
                self._stamps.clear()
            self._stamps.add(stamp)


def open_indexed(
    record: ImageRecord, path: Path, folder: Path, rehashed: Rehashed | None = None
) -> OpenedFile:
    """Open the file of ``record`` at ``path`` if it is still the regular file inside ``folder`` that was
    indexed; else 404 (missing, unreadable, not a regular file, outside the folder) or 409 (changed)."""
    resolved = os.path.realpath(path)
    if not _inside(resolved, folder):
        raise _refused(record, "it resolves outside the collection's folder (a symlink?)")
    try:
        descriptor = os.open(resolved, OPEN_FLAGS)
    except FileNotFoundError:
        raise ApiError(
            404, "file missing", f"image {record.id} is no longer on disk; re-index the collection"
        ) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refused(record, "it became a symlink") from None
        raise ApiError(404, "file unreadable", f"image {record.id}: {exc.strerror or exc}") from None
    opened = OpenedFile(descriptor, 0, path.name)
    try:
        status = os.fstat(descriptor)
        if not stat.S_ISREG(status.st_mode):
            raise _refused(record, "it is not a regular file (a folder, FIFO, socket or device)")
        if not _inside(_opened_path(descriptor, resolved), folder):
            raise _refused(record, "it resolves outside the collection's folder (a symlink?)")
        os.set_blocking(descriptor, True)
        opened.size = status.st_size
        stamp = (record.id, status.st_dev, status.st_ino, status.st_size, status.st_mtime_ns)
        if status.st_size != record.size or (
            status.st_mtime_ns != record.mtime_ns
            and not (rehashed is not None and stamp in rehashed)
            and opened.sha256() != record.sha256
        ):
            raise ApiError(
                409,
                "file changed",
                f"image {record.id} changed on disk since it was indexed; re-index the collection "
                "(lookalike index)",
            )
        if rehashed is not None and status.st_mtime_ns != record.mtime_ns:
            rehashed.add(stamp)
        return opened
    except BaseException:
        opened.close()
        raise


def _inside(path: str, folder: Path) -> bool:
    return Path(path).is_relative_to(folder)


def _opened_path(descriptor: int, fallback: str) -> str:
    """Where the kernel says the open descriptor is (Linux); ``fallback`` where it cannot tell."""
    try:
        return os.readlink(f"/proc/self/fd/{descriptor}")
    except OSError:
        return fallback


def _refused(record: ImageRecord, why: str) -> ApiError:
    return ApiError(404, "file refused", f"image {record.id} is not served: {why}")


def media_type(opened: OpenedFile) -> str:
    """The content type of an image file, from its content (the name only when Pillow cannot tell)."""
    try:
        with os.fdopen(os.dup(opened.descriptor), "rb") as handle, Image.open(handle) as image:
            mime = Image.MIME.get(image.format or "")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
        mime = None
    return mime or mimetypes.guess_type(opened.name)[0] or "application/octet-stream"


def make_thumbnail(data: bytes, name: str, size: int, max_pixels: int | None) -> bytes:
    """A JPEG of the encoded image ``data`` whose long side is at most ``size`` pixels, upright, in RGB."""
    image = load_image_bytes(data, name, max_pixels)
    image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85, optimize=True)
    return buffer.getvalue()


class ThumbnailCache:
    """Thumbnails of one size under ``folder``, each made at most once even when asked for concurrently."""

    def __init__(self, folder: Path, size: int, max_pixels: int | None) -> None:
        self.folder = Path(folder)
        self.size = size
        self.max_pixels = max_pixels
        self.made = 0  # thumbnails made by this cache: for tests and logs
        self._stripes = [threading.Lock() for _ in range(64)]
        self._counting = threading.Lock()

    def path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}-{self.size}.jpg"

    def get(self, source: OpenedFile, sha256: str) -> Path | bytes:
        """The cached thumbnail's path, made now if needed; its bytes if the folder cannot be written."""
        target = self.path(sha256)
        if target.exists():
            return target
        with self._stripes[zlib.crc32(sha256.encode()) % len(self._stripes)]:
            if target.exists():
                return target
            data = make_thumbnail(source.read(), source.name, self.size, self.max_pixels)
            with self._counting:
                self.made += 1
            try:
                with atomic_write(target) as handle:
                    handle.write(data)
            except OSError as exc:
                log.warning("thumbnail of %s not cached in %s: %s", source.name, self.folder, exc)
                return data
        return target


class OpenedFileResponse(Response):
    """Streams an opened, checked file from its descriptor — never reopened by name, so what was checked
    is what is sent — and closes it. HEAD gets the headers alone."""

    def __init__(self, opened: OpenedFile, media_type: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(None, 200, {**(headers or {}), "Content-Length": str(opened.size)}, media_type)
        self.opened = opened

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await send(
                {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
            )
            offset, size = 0, self.opened.size
            if scope.get("method") == "HEAD" or size == 0:
                await send({"type": "http.response.body", "body": b""})
                return
            while offset < size:
                part = await anyio.to_thread.run_sync(
                    os.pread, self.opened.descriptor, min(CHUNK, size - offset), offset
                )
                if not part:
                    raise OSError(f"{self.opened.name} shrank while it was sent")
                offset += len(part)
                await send({"type": "http.response.body", "body": part, "more_body": offset < size})
        finally:
            self.opened.close()
