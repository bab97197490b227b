"""Image files the tests generate: odd encodings, broken files, and families of distinct real photos."""

from __future__ import annotations

import hashlib
import io
import shutil
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from PIL import Image, ImageOps

from lookalike.extract import DescriptorSettings
from tests.conftest import SAMPLE

try:
    import pillow_heif
except ImportError:
    pillow_heif = None

HAS_HEIF = pillow_heif is not None
SAMPLE_PHOTOS = sorted(SAMPLE.glob("*.jpg"))


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(side: int) -> bytes:
    """A valid all-black 1-bit PNG of side x side pixels, a few kilobytes on disk."""
    assert side % 100 == 0
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    hundred_rows = bytes(1 + (side + 7) // 8) * 100
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(hundred_rows) for _ in range(side // 100)) + compressor.flush()
    chunks = [_png_chunk(b"IHDR", ihdr), _png_chunk(b"IDAT", idat), _png_chunk(b"IEND", b"")]
    return b"\x89PNG\r\n\x1a\n" + b"".join(chunks)


def marked_image(width: int = 60, height: int = 40) -> Image.Image:
    """Grey image with a red block in the stored top-left corner."""
    img = Image.new("RGB", (width, height), (128, 128, 128))
    img.paste((255, 0, 0), (0, 0, 12, 12))
    return img


def exif_with_orientation(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif.tobytes()


def encode(img: Image.Image, fmt: str, **params: object) -> bytes:
    buf = io.BytesIO()
    if fmt == "HEIF":
        # Written through pillow-heif's own API: registering its Pillow opener is the library's job.
        pillow_heif.from_pillow(img).save(buf, **params)
    else:
        img.save(buf, fmt, **params)
    return buf.getvalue()


def copy_sample(folder: Path) -> Path:
    """The 10 sample photos copied into ``folder`` (created)."""
    folder.mkdir(parents=True, exist_ok=True)
    for photo in SAMPLE_PHOTOS:
        shutil.copy2(photo, folder / photo.name)
    return folder


VARIANTS = ("whole", "flip", "crop", "crop-flip")


def variant(photo: Path, kind: str) -> Image.Image:
    """A visibly different version of a sample photo: as is, mirrored, or its centre crop (mirrored)."""
    with Image.open(photo) as opened:
        img = opened.convert("RGB")
    if kind.startswith("crop"):
        width, height = img.size
        img = img.crop((width // 8, height // 8, width - width // 8, height - height // 8))
    if kind.endswith("flip"):
        img = ImageOps.mirror(img)
    return img


def photo_family(folder: Path, count: int = 40) -> list[Path]:
    """``count`` (at most 40) JPEGs of distinct content, made from the sample photos, named in walk order."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        photo = SAMPLE_PHOTOS[i % len(SAMPLE_PHOTOS)]
        kind = VARIANTS[(i // len(SAMPLE_PHOTOS)) % len(VARIANTS)]
        path = folder / f"{i:03d}-{photo.stem}-{kind}.jpg"
        path.write_bytes(encode(variant(photo, kind), "JPEG", quality=85))
        paths.append(path)
    assert len({sha256(p) for p in paths}) == count, "photo_family made two identical files"
    return paths


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@contextmanager
def one_network_per_setting() -> Iterator[None]:
    """Collections build their extractor when opened; share one per settings so a test module stays quick.

    An extractor holds no state between calls, so sharing it changes no descriptor.
    """
    from lookalike.extract import Extractor

    built: dict[tuple[object, ...], Extractor] = {}

    def shared(settings: DescriptorSettings | None = None, *args: object) -> Extractor:
        key = (settings or DescriptorSettings(), *args)
        if key not in built:
            built[key] = Extractor(settings, *args)
        return built[key]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("lookalike.collection.collection.Extractor", shared)
        yield


@pytest.fixture(scope="module", autouse=True)
def shared_resnet50_network() -> Iterator[None]:
    """Autouse where imported: one ResNet-50 extractor per settings for the whole test module."""
    from tests.conftest import require_weights

    require_weights("resnet50.keras-imagenet")
    with one_network_per_setting():
        yield
