"""Indexed image files as the server sends them: their content type, and JPEG thumbnails made once.

Thumbnails live in the collection folder under ``thumbs/``, named by the content's sha256 and the size
(``thumbs/ab/ab12…-256.jpg``), so identical files share one and a changed file gets a new one. Each is
written to a temporary file and renamed into place: a reader never sees half a thumbnail.
"""

from __future__ import annotations

import io
import logging
import mimetypes
import threading
import zlib
from pathlib import Path

from PIL import Image

from lookalike.atomic import atomic_write
from lookalike.images import load_image

log = logging.getLogger(__name__)

THUMBS = "thumbs"


def media_type(path: Path) -> str:
    """The content type of an image file, from its content (the name only when Pillow cannot tell)."""
    try:
        with Image.open(path) as image:
            mime = Image.MIME.get(image.format or "")
    except (OSError, ValueError, Image.DecompressionBombError):
        mime = None
    return mime or mimetypes.guess_type(path.name)[0] or "application/octet-stream"


def make_thumbnail(source: Path, size: int, max_pixels: int | None) -> bytes:
    """A JPEG of ``source`` whose long side is at most ``size`` pixels, upright, in RGB."""
    image = load_image(source, max_pixels)
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

    def get(self, source: Path, sha256: str) -> Path | bytes:
        """The cached thumbnail's path, made now if needed; its bytes if the folder cannot be written."""
        target = self.path(sha256)
        if target.exists():
            return target
        with self._stripes[zlib.crc32(sha256.encode()) % len(self._stripes)]:
            if target.exists():
                return target
            data = make_thumbnail(source, self.size, self.max_pixels)
            with self._counting:
                self.made += 1
            try:
                with atomic_write(target) as handle:
                    handle.write(data)
            except OSError as exc:
                log.warning("thumbnail of %s not cached in %s: %s", source, self.folder, exc)
                return data
        return target
