"""Decode, orient, convert, resize and crop images: the only module that touches raw image files.

Content is identified from the bytes, never from the file name. Every failure is raised as a typed
``ImageError`` naming the file; Pillow's global settings (``MAX_IMAGE_PIXELS``, ``LOAD_TRUNCATED_IMAGES``)
are read by Pillow but never changed here.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import stat
import struct
from collections.abc import Sequence
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps, PngImagePlugin, TiffImagePlugin, UnidentifiedImageError, features

from lookalike.errors import (
    ConfigError,
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "crop_bbox",
    "image_size",
    "is_image_file",
    "load_image",
    "load_image_bytes",
    "open_regular_file",
    "read_file_bytes",
    "resize_long_side",
    "resize_max_side",
    "sha256_of_file",
    "to_rgb",
]

StrPath = str | os.PathLike[str]

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".gif", ".bmp", ".dib", ".tif", ".tiff"}
    | {".heic", ".heif", ".hif", ".avif", ".jp2", ".j2k", ".ppm", ".pgm", ".pbm", ".pnm"}
)

# Equal to Pillow's default warning threshold, so Pillow never warns about an image this limit accepts.
DEFAULT_MAX_PIXELS = 89_478_485

_WHITE = (255, 255, 255)

_ROTATED_ORIENTATIONS = frozenset({5, 6, 7, 8})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    IndexError,
    TypeError,
    struct.error,
    RuntimeError,
)

_MAGIC: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WEBP"),
    (4, b"ftypavi", "AVIF"),
    (4, b"ftyphei", "HEIF"),
    (4, b"ftyphev", "HEIF"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypmsf1", "HEIF"),
)


def is_image_file(path: StrPath) -> bool:
    """True if the name has an image extension and is not hidden (the file itself is not read)."""
    name = os.path.basename(os.fspath(path))
    return not name.startswith(".") and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def load_image(path: StrPath, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode an image file into an 8-bit RGB image, upright per its EXIF orientation.

    Images with more than ``max_pixels`` pixels are refused from their header, before decoding
    (``None`` lifts this limit; Pillow's own ``Image.MAX_IMAGE_PIXELS`` still applies if set).
    """
    with open_regular_file(path) as fp:
        return _decode(fp, os.fspath(path), max_pixels)


def load_image_bytes(
    data: bytes | bytearray | memoryview | BinaryIO,
    name: str = "<upload>",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
) -> Image.Image:
    """Like ``load_image`` for an encoded image held in memory or in a binary file object.

    ``name`` only labels errors and logs.
    """
    raw = data if isinstance(data, (bytes, bytearray, memoryview)) else data.read()
    return _decode(io.BytesIO(raw), name, max_pixels)


def image_size(path: StrPath) -> tuple[int, int]:
    """``(width, height)`` of the upright image, read from the header without decoding pixels."""
    name = os.fspath(path)
    with open_regular_file(path) as fp:
        im = _identify(fp, name)
        width, height = _stored_size(im)
        orientation = _header_orientation(im, name)
    return (height, width) if orientation in _ROTATED_ORIENTATIONS else (width, height)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparency is composited on white.

    16-bit grey (``I;16``, ``I``) is scaled from 0..65535 to 0..255, not clipped.
    """
    if img.mode == "RGB" and not img.has_transparency_data:
        return img
    if img.mode in _SIXTEEN_BIT_MODES:
        img = _sixteen_bit_to_l(img)
    if img.has_transparency_data:
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, _WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def resize_max_side(img: Image.Image, imsize: int) -> Image.Image:
    """Shrink so the long side is ``imsize``; an image already that small is returned as is."""
    _check_side(imsize)
    if max(img.size) <= imsize:
        return img
    return resize_long_side(img, imsize)


def resize_long_side(img: Image.Image, side: int) -> Image.Image:
    """Resize, up or down, so the long side is exactly ``side``, keeping the aspect ratio."""
    _check_side(side)
    width, height = img.size
    if width >= height:
        size = (side, max(1, round(height * side / width)))
    else:
        size = (max(1, round(width * side / height)), side)
    if size == img.size:
        return img
    # LANCZOS without reducing_gap, as cirtorch's imresize (Image.ANTIALIAS), so descriptors match theirs.
    return img.resize(size, Image.Resampling.LANCZOS)


def crop_bbox(img: Image.Image, bbox: Sequence[float]) -> Image.Image:
    """Crop to ``(x0, y0, x1, y1)`` in pixel coordinates of ``img``, clipped to the image.

    Coordinates are rounded like ``Image.crop`` rounds them; a box that is empty, inverted,
    not finite, or entirely outside the image raises ``ConfigError``.
    """
    if len(bbox) != 4:
        raise ConfigError(f"bbox must be (x0, y0, x1, y1), got {tuple(bbox)!r}")
    x0, y0, x1, y1 = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)):
        raise ConfigError(f"bbox has a non-finite coordinate: {tuple(bbox)!r}")
    if x1 <= x0 or y1 <= y0:
        raise ConfigError(f"bbox is empty or inverted: {tuple(bbox)!r}")
    width, height = img.size
    box = (
        min(max(round(x0), 0), width),
        min(max(round(y0), 0), height),
        min(max(round(x1), 0), width),
        min(max(round(y1), 0), height),
    )
    if box[2] <= box[0] or box[3] <= box[1]:
        raise ConfigError(f"bbox {tuple(bbox)!r} covers no pixel of a {width}x{height} image")
    return img.crop(box)


def _check_side(side: int) -> None:
    if isinstance(side, bool) or not isinstance(side, int) or side < 1:
        raise ConfigError(f"image side must be a positive integer, got {side!r}")


def open_regular_file(path: StrPath) -> BinaryIO:
    """Open a regular file for reading, never blocking: a FIFO, socket or device raises ``ImageError``.

    The open is non-blocking (a FIFO with no writer would otherwise hang forever) and the type is checked on
    the opened descriptor, so a file swapped for a FIFO between a stat and the open is refused too.
    """
    name = os.fspath(path)
    try:
        descriptor = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError as exc:
        raise ImageError(name, "file not found") from exc
    except IsADirectoryError as exc:
        raise ImageError(name, "is a directory, not an image file") from exc
    except PermissionError as exc:
        raise ImageError(name, "permission denied") from exc
    except OSError as exc:
        raise ImageError(name, f"cannot open: {exc.strerror or exc}") from exc
    try:
        mode = os.fstat(descriptor).st_mode
        if stat.S_ISDIR(mode):
            raise ImageError(name, "is a directory, not an image file")
        if not stat.S_ISREG(mode):
            raise ImageError(name, "not a regular file (a FIFO, socket or device)")
        os.set_blocking(descriptor, True)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def read_file_bytes(path: StrPath) -> tuple[bytes, os.stat_result]:
    """A regular file's bytes and the ``fstat`` of the very descriptor they were read from."""
    with open_regular_file(path) as fp:
        status = os.fstat(fp.fileno())
        try:
            return fp.read(), status
        except OSError as exc:
            raise ImageError(os.fspath(path), f"cannot read: {exc.strerror or exc}") from exc


def sha256_of_file(path: StrPath, chunk: int = 1 << 20) -> str:
    """The sha256 of a regular file's content, read without ever blocking on a FIFO or device."""
    digest = hashlib.sha256()
    with open_regular_file(path) as fp:
        try:
            while block := fp.read(chunk):
                digest.update(block)
        except OSError as exc:
            raise ImageError(os.fspath(path), f"cannot read: {exc.strerror or exc}") from exc
    return digest.hexdigest()


@functools.cache
def _heif_available() -> bool:
    try:
        import pillow_heif
    except ImportError:
        logger.info("pillow-heif is not installed; HEIC/HEIF images cannot be read")
        return False
    pillow_heif.register_heif_opener()
    return True


def _format_readable(fmt: str) -> bool:
    if fmt == "HEIF":
        return _heif_available()
    if fmt == "AVIF":
        return bool(features.check("avif"))
    return True


def _sniff(head: bytes) -> str | None:
    for offset, magic, fmt in _MAGIC:
        if head[offset : offset + len(magic)] == magic:
            return fmt
    return None


def _unidentified(fp: BinaryIO, name: str) -> ImageError:
    fp.seek(0)
    head = fp.read(32)
    if not head:
        return UnsupportedImageError(name, "empty file (0 bytes)")
    fmt = _sniff(head)
    if fmt is None:
        return UnsupportedImageError(name, f"not an image in a readable format (starts with {head[:12]!r})")
    if not _format_readable(fmt):
        return UnsupportedImageError(name, f"{fmt} image, but this installation cannot decode {fmt}")
    return CorruptImageError(name, f"starts like {fmt} data but its header cannot be read")


def _identify(fp: BinaryIO, name: str) -> Image.Image:
    _heif_available()
    try:
        return Image.open(fp)
    except UnidentifiedImageError:
        raise _unidentified(fp, name) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"refused by Pillow's limit: {_why(exc)}") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(name, f"cannot read the image header: {_why(exc)}") from exc


def _decode(fp: BinaryIO, name: str, max_pixels: int | None) -> Image.Image:
    if max_pixels is not None and max_pixels < 1:
        raise ConfigError(f"max_pixels must be positive or None, got {max_pixels!r}")
    im = _identify(fp, name)
    width, height = im.size
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            name, f"{width}x{height} = {width * height} pixels exceeds the limit of {max_pixels} pixels"
        )
    try:
        im.load()
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(name, f"refused by Pillow's limit: {_why(exc)}") from exc
    except _DECODE_ERRORS as exc:
        raise CorruptImageError(name, f"cannot decode {im.format} data: {_why(exc)}") from exc
    _apply_orientation(im, name)
    try:
        return to_rgb(im)
    except ValueError as exc:
        raise UnsupportedImageError(name, f"cannot convert colour mode {im.mode} to RGB") from exc


def _apply_orientation(im: Image.Image, name: str) -> None:
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except _DECODE_ERRORS as exc:
        logger.warning("%s: unreadable EXIF orientation ignored: %s", name, _why(exc))


def _stored_size(im: Image.Image) -> tuple[int, int]:
    if isinstance(im, TiffImagePlugin.TiffImageFile):
        # Recent Pillow reports a TIFF's size already swapped for its orientation, but not older ones.
        return int(im.tag_v2[256]), int(im.tag_v2[257])
    return im.size


def _header_orientation(im: Image.Image, name: str) -> int:
    if isinstance(im, PngImagePlugin.PngImageFile) and "exif" not in im.info:
        # PngImageFile.getexif() decodes all pixels to look for an eXIf chunk stored after them.
        return 1
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except _DECODE_ERRORS as exc:
        logger.warning("%s: unreadable EXIF orientation ignored: %s", name, _why(exc))
        return 1


def _sixteen_bit_to_l(img: Image.Image) -> Image.Image:
    values = np.clip(np.asarray(img, dtype=np.int64), 0, 65535)
    # 65535 = 255 * 257, so dividing by 257 maps the 16-bit range exactly onto 0..255.
    return Image.fromarray(((values + 128) // 257).astype(np.uint8))


def _why(exc: BaseException) -> str:
    return str(exc).strip() or type(exc).__name__
