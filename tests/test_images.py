from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data
from PIL import Image, ImageFile, ImageOps, features

from lookalike.errors import (
    ConfigError,
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)
from lookalike.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    crop_bbox,
    image_size,
    is_image_file,
    load_image,
    load_image_bytes,
    resize_long_side,
    resize_max_side,
    to_rgb,
)
from tests.corpus import HAS_HEIF, bomb_png, encode, exif_with_orientation, marked_image

CHELSEA = skimage.data.chelsea()  # a real photo, 300 x 451 RGB
CHELSEA_SIZE = (CHELSEA.shape[1], CHELSEA.shape[0])
BOMB_SIDE = 20_000
HAS_AVIF = bool(features.check("avif"))


def _build_corpus(root: Path) -> dict[str, Path]:
    photo = Image.fromarray(CHELSEA)
    files: dict[str, bytes] = {
        "photo.jpg": encode(photo, "JPEG", quality=95),
        "photo.png": encode(photo, "PNG"),
        "photo.webp": encode(photo, "WEBP", quality=95),
        "photo.tiff": encode(photo, "TIFF", compression="tiff_lzw"),
        "photo.bmp": encode(photo, "BMP"),
        "cmyk.jpg": encode(photo.convert("CMYK"), "JPEG", quality=95),
        "grey.jpg": encode(photo.convert("L"), "JPEG", quality=95),
        "empty.jpg": b"",
        "text.jpg": b"hello, this is a text file and not a picture\n" * 4,
        "bomb.png": bomb_png(BOMB_SIDE),
        "rotated6.jpg": encode(marked_image(), "JPEG", quality=95, exif=exif_with_orientation(6)),
        "png-named.jpg": encode(photo, "PNG"),
        "chat été 猫 photo.jpg": encode(photo, "JPEG", quality=95),
    }
    files["truncated.jpg"] = files["photo.jpg"][: len(files["photo.jpg"]) // 2]
    files["truncated.png"] = files["photo.png"][: len(files["photo.png"]) // 2]
    broken = bytearray(files["photo.png"])
    broken[29] ^= 0xFF  # the IHDR checksum
    files["broken-header.png"] = bytes(broken)

    gradient = np.tile(np.linspace(0, 65535, 256).round().astype(np.uint16), (8, 1))
    files["grey16.png"] = encode(Image.fromarray(gradient), "PNG")

    palette = Image.new("P", (20, 10), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0])
    palette.paste(1, (10, 0, 20, 10))
    files["palette-trns.png"] = encode(palette, "PNG", transparency=0)

    rgba = np.zeros((10, 30, 4), np.uint8)
    rgba[:, 10:20] = (0, 0, 255, 255)
    rgba[:, 20:] = (255, 0, 0, 128)
    files["rgba.png"] = encode(Image.fromarray(rgba), "PNG")

    la = np.zeros((10, 20, 2), np.uint8)
    la[:, 10:] = (0, 255)
    files["la.png"] = encode(Image.fromarray(la, mode="LA"), "PNG")

    frames = [Image.new("RGB", (16, 16), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    files["animated.gif"] = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100)

    if HAS_HEIF:
        files["photo.heic"] = encode(photo, "HEIF", quality=95)
    if HAS_AVIF:
        files["photo.avif"] = encode(photo, "AVIF", quality=95)

    for name, data in files.items():
        (root / name).write_bytes(data)
    (root / "folder.jpg").mkdir()
    return {name: root / name for name in [*files, "folder.jpg"]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return _build_corpus(tmp_path_factory.mktemp("corpus"))


def mean_abs_diff(img: Image.Image, reference: np.ndarray) -> float:
    return float(np.abs(np.asarray(img, dtype=np.float64) - reference).mean())


PHOTOS = [
    ("photo.jpg", 3.0),
    ("photo.png", 0.0),
    ("photo.webp", 4.0),
    ("photo.tiff", 0.0),
    ("photo.bmp", 0.0),
    ("cmyk.jpg", 4.0),
    ("png-named.jpg", 0.0),
    ("chat été 猫 photo.jpg", 3.0),
    pytest.param("photo.heic", 4.0, marks=pytest.mark.skipif(not HAS_HEIF, reason="pillow-heif missing")),
    pytest.param("photo.avif", 4.0, marks=pytest.mark.skipif(not HAS_AVIF, reason="Pillow without AVIF")),
]


@pytest.mark.parametrize(("name", "tolerance"), PHOTOS)
def test_photo_formats_decode_to_the_original_pixels(
    corpus: dict[str, Path], name: str, tolerance: float
) -> None:
    img = load_image(corpus[name])
    assert img.mode == "RGB"
    assert img.size == CHELSEA_SIZE
    assert mean_abs_diff(img, CHELSEA.astype(np.float64)) <= tolerance


@pytest.mark.parametrize(("name", "_tolerance"), PHOTOS)
def test_bytes_and_file_objects_decode_like_paths(
    corpus: dict[str, Path], name: str, _tolerance: float
) -> None:
    from_path = np.asarray(load_image(corpus[name]))
    data = corpus[name].read_bytes()
    assert np.array_equal(np.asarray(load_image_bytes(data)), from_path)
    assert np.array_equal(np.asarray(load_image_bytes(io.BytesIO(data))), from_path)
    assert np.array_equal(np.asarray(load_image_bytes(memoryview(data))), from_path)


def test_grey_jpeg_becomes_three_equal_channels(corpus: dict[str, Path]) -> None:
    arr = np.asarray(load_image(corpus["grey.jpg"]))
    assert arr.shape == (*CHELSEA.shape[:2], 3)
    assert np.array_equal(arr[..., 0], arr[..., 1])
    assert np.array_equal(arr[..., 0], arr[..., 2])
    assert arr.std() > 10


def test_sixteen_bit_png_is_scaled_not_clipped(corpus: dict[str, Path]) -> None:
    arr = np.asarray(load_image(corpus["grey16.png"]))
    row = arr[0, :, 0]
    assert arr.dtype == np.uint8
    assert row[0] == 0
    assert row[-1] == 255
    assert 126 <= row[128] <= 130
    assert len(np.unique(row)) == 256
    assert np.all(np.diff(row.astype(int)) >= 0)


def test_palette_transparency_is_composited_on_white(corpus: dict[str, Path]) -> None:
    arr = np.asarray(load_image(corpus["palette-trns.png"]))
    assert (arr[:, :10] == 255).all()
    assert (arr[:, 10:] == (0, 255, 0)).all()


def test_alpha_is_composited_on_white(corpus: dict[str, Path]) -> None:
    arr = np.asarray(load_image(corpus["rgba.png"])).astype(int)
    assert (arr[:, :10] == 255).all()
    assert (arr[:, 10:20] == (0, 0, 255)).all()
    assert np.abs(arr[:, 20:] - (255, 127, 127)).max() <= 1


def test_grey_with_alpha_is_composited_on_white(corpus: dict[str, Path]) -> None:
    arr = np.asarray(load_image(corpus["la.png"]))
    assert (arr[:, :10] == 255).all()
    assert (arr[:, 10:] == 0).all()


def test_animated_gif_gives_its_first_frame(corpus: dict[str, Path]) -> None:
    arr = np.asarray(load_image(corpus["animated.gif"]))
    assert arr.shape == (16, 16, 3)
    assert (arr == (255, 0, 0)).all()


def _expected_upright(stored: np.ndarray, orientation: int) -> np.ndarray:
    transforms = {
        1: lambda a: a,
        2: np.fliplr,
        3: lambda a: np.rot90(a, 2),
        4: np.flipud,
        5: lambda a: a.transpose(1, 0, 2),
        6: lambda a: np.rot90(a, -1),
        7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
        8: lambda a: np.rot90(a, 1),
    }
    return transforms[orientation](stored)


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["PNG", "TIFF", "WEBP"])
def test_every_exif_orientation_matches_a_numpy_reference(tmp_path: Path, fmt: str, orientation: int) -> None:
    stored = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)
    params: dict[str, object] = {"exif": exif_with_orientation(orientation)}
    if fmt == "WEBP":
        params["lossless"] = True
    path = tmp_path / f"oriented.{fmt.lower()}"
    path.write_bytes(encode(Image.fromarray(stored), fmt, **params))
    expected = _expected_upright(stored, orientation)
    assert np.array_equal(np.asarray(load_image(path)), expected)
    assert image_size(path) == (expected.shape[1], expected.shape[0])


LOSSY_ORIENTED = [
    "JPEG",
    pytest.param("HEIF", marks=pytest.mark.skipif(not HAS_HEIF, reason="pillow-heif missing")),
    pytest.param("AVIF", marks=pytest.mark.skipif(not HAS_AVIF, reason="Pillow without AVIF")),
]


@pytest.mark.parametrize("fmt", LOSSY_ORIENTED)
def test_orientation_6_in_lossy_formats(tmp_path: Path, fmt: str) -> None:
    path = tmp_path / "rotated.img"
    path.write_bytes(encode(marked_image(), fmt, quality=95, exif=exif_with_orientation(6)))
    img = load_image(path)
    arr = np.asarray(img).astype(int)
    assert img.size == (40, 60)
    assert arr[4, 35, 0] > 200 and arr[4, 35, 1] < 60
    assert np.abs(arr[4, 4] - 128).max() < 20
    assert image_size(path) == (40, 60)


GOOD_FILES = [
    "photo.jpg",
    "photo.png",
    "photo.webp",
    "photo.tiff",
    "photo.bmp",
    "cmyk.jpg",
    "grey.jpg",
    "grey16.png",
    "palette-trns.png",
    "rgba.png",
    "la.png",
    "animated.gif",
    "rotated6.jpg",
    "chat été 猫 photo.jpg",
]


def test_unreadable_exif_is_ignored_with_a_warning(
    corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(ImageOps, "exif_transpose", broken)
    monkeypatch.setattr(Image.Exif, "get", broken)
    with caplog.at_level(logging.WARNING, logger="lookalike.images"):
        assert load_image(corpus["rotated6.jpg"]).size == (60, 40)
        assert image_size(corpus["rotated6.jpg"]) == (60, 40)
    warnings = [r for r in caplog.records if "EXIF orientation ignored" in r.getMessage()]
    assert len(warnings) == 2
    assert all(str(corpus["rotated6.jpg"]) in r.getMessage() for r in warnings)


@pytest.mark.parametrize("name", GOOD_FILES)
def test_image_size_agrees_with_the_decoded_image(corpus: dict[str, Path], name: str) -> None:
    assert image_size(corpus[name]) == load_image(corpus[name]).size


def test_image_size_reads_only_the_header(corpus: dict[str, Path]) -> None:
    assert image_size(corpus["truncated.jpg"]) == CHELSEA_SIZE
    assert image_size(corpus["truncated.png"]) == CHELSEA_SIZE
    with pytest.raises(CorruptImageError):
        load_image(corpus["truncated.jpg"])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


BAD_FILES = [
    ("empty.jpg", UnsupportedImageError, "empty"),
    ("text.jpg", UnsupportedImageError, "not an image"),
    ("truncated.jpg", CorruptImageError, "truncated"),
    ("truncated.png", CorruptImageError, "PNG"),
    ("broken-header.png", CorruptImageError, "starts like PNG"),
]


@pytest.mark.parametrize(("name", "error", "words"), BAD_FILES)
def test_bad_files_raise_typed_errors_naming_the_file(
    corpus: dict[str, Path], name: str, error: type[ImageError], words: str
) -> None:
    path = corpus[name]
    with pytest.raises(error) as caught:
        load_image(path)
    assert caught.value.path == str(path)
    assert str(path) in str(caught.value)
    assert words in caught.value.reason


@pytest.mark.parametrize(("name", "error", "words"), BAD_FILES)
def test_bad_bytes_raise_the_same_errors(
    corpus: dict[str, Path], name: str, error: type[ImageError], words: str
) -> None:
    with pytest.raises(error) as caught:
        load_image_bytes(corpus[name].read_bytes(), name="upload-42")
    assert caught.value.path == "upload-42"
    assert words in caught.value.reason


def test_a_directory_is_not_an_image(corpus: dict[str, Path]) -> None:
    with pytest.raises(ImageError, match="directory") as caught:
        load_image(corpus["folder.jpg"])
    assert caught.value.path == str(corpus["folder.jpg"])


def test_a_missing_file_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere 猫.jpg"
    for read in (load_image, image_size):
        with pytest.raises(ImageError, match="not found") as caught:
            read(missing)
        assert caught.value.path == str(missing)


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="chmod 000 does not stop root")
def test_an_unreadable_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "secret.jpg"
    path.write_bytes(encode(marked_image(), "JPEG"))
    path.chmod(0)
    try:
        with pytest.raises(ImageError, match="permission") as caught:
            load_image(path)
        assert caught.value.path == str(path)
    finally:
        path.chmod(0o600)


@pytest.mark.parametrize(
    ("error", "words"),
    [
        (PermissionError(13, "Permission denied"), "permission denied"),
        (OSError(5, "Input/output error"), "Input/output"),
    ],
)
def test_open_failures_are_named_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: OSError, words: str
) -> None:
    def failing_open(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr("lookalike.images.os.open", failing_open)
    path = tmp_path / "photo.jpg"
    with pytest.raises(ImageError, match=words) as caught:
        load_image(path)
    assert caught.value.path == str(path)


def test_bomb_builder_makes_a_valid_png() -> None:
    img = load_image_bytes(bomb_png(1500))
    assert img.size == (1500, 1500)
    assert np.asarray(img).max() == 0


def test_bomb_is_small_on_disk_and_refused(corpus: dict[str, Path]) -> None:
    path = corpus["bomb.png"]
    assert path.stat().st_size < 200_000
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(path)
    assert str(BOMB_SIDE * BOMB_SIDE) in caught.value.reason
    assert caught.value.path == str(path)


def test_bomb_guard_does_not_rely_on_pillows_global(
    corpus: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(corpus["bomb.png"])
    assert f"{BOMB_SIDE}x{BOMB_SIDE}" in caught.value.reason
    assert str(BOMB_SIDE * BOMB_SIDE) in caught.value.reason
    assert str(DEFAULT_MAX_PIXELS) in caught.value.reason
    with pytest.raises(ImageTooLargeError):
        load_image_bytes(corpus["bomb.png"].read_bytes())
    assert image_size(corpus["bomb.png"]) == (BOMB_SIDE, BOMB_SIDE)


def test_max_pixels_is_an_inclusive_limit(corpus: dict[str, Path]) -> None:
    pixels = CHELSEA_SIZE[0] * CHELSEA_SIZE[1]
    assert load_image(corpus["photo.jpg"], max_pixels=pixels).size == CHELSEA_SIZE
    assert load_image(corpus["photo.jpg"], max_pixels=None).size == CHELSEA_SIZE
    with pytest.raises(ImageTooLargeError) as caught:
        load_image(corpus["photo.jpg"], max_pixels=pixels - 1)
    assert str(pixels) in caught.value.reason
    assert str(pixels - 1) in caught.value.reason


@pytest.mark.parametrize("max_pixels", [0, -5])
def test_max_pixels_must_be_positive(corpus: dict[str, Path], max_pixels: int) -> None:
    with pytest.raises(ConfigError):
        load_image(corpus["photo.jpg"], max_pixels=max_pixels)


def test_to_rgb_modes() -> None:
    assert to_rgb(Image.new("1", (2, 2), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("L", (2, 2), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("CMYK", (2, 2), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    keyed = Image.new("RGB", (2, 1), (255, 0, 0))
    keyed.putpixel((1, 0), (0, 0, 255))
    keyed.info["transparency"] = (255, 0, 0)
    assert list(np.asarray(to_rgb(keyed)).reshape(-1, 3).tolist()) == [[255, 255, 255], [0, 0, 255]]
    wide = Image.fromarray(np.array([[0, 257 * 100, 65535, 70000, -3]], dtype=np.int32))
    assert wide.mode == "I"
    assert np.asarray(to_rgb(wide))[0, :, 0].tolist() == [0, 100, 255, 255, 0]
    rgb = Image.new("RGB", (2, 2))
    assert to_rgb(rgb) is rgb


def test_image_extensions_are_lower_case_with_a_dot() -> None:
    assert {".jpg", ".jpeg", ".png", ".webp", ".tif", ".tiff", ".gif", ".bmp", ".heic", ".heif", ".avif"} <= (
        IMAGE_EXTENSIONS
    )
    assert all(ext.startswith(".") and ext == ext.lower() for ext in IMAGE_EXTENSIONS)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("a.jpg", True),
        ("dir/b.JPEG", True),
        ("c.HeIc", True),
        ("d photo 猫.avif", True),
        (".hidden.jpg", False),
        ("dir/._resource.jpg", False),
        ("notes.txt", False),
        ("jpg", False),
        ("archive.jpg.zip", False),
    ],
)
def test_is_image_file(name: str, expected: bool) -> None:
    assert is_image_file(name) is expected
    assert is_image_file(Path(name)) is expected


def test_resize_max_side_never_upscales() -> None:
    img = Image.fromarray(CHELSEA)
    assert resize_max_side(img, 451) is img
    assert resize_max_side(img, 1024) is img


@pytest.mark.parametrize(
    ("size", "side", "expected"),
    [((451, 300), 200, (200, 133)), ((300, 451), 200, (133, 200)), ((1000, 667), 500, (500, 334))],
)
def test_resize_max_side_keeps_aspect(size: tuple[int, int], side: int, expected: tuple[int, int]) -> None:
    img = Image.fromarray(CHELSEA).resize(size)
    out = resize_max_side(img, side)
    assert out.size == expected
    assert max(out.size) == side
    assert abs(out.width / out.height - size[0] / size[1]) < 0.01


def test_resize_keeps_content() -> None:
    img = Image.fromarray(CHELSEA)
    small = resize_max_side(img, 226)
    reference = np.asarray(img.reduce(2), dtype=np.float64)
    assert mean_abs_diff(small, reference[:150, :226]) < 6


def test_resize_is_antialiased() -> None:
    stripes = Image.fromarray(np.tile(np.array([0, 255], np.uint8), (80, 40)))
    arr = np.asarray(resize_max_side(stripes, 20), dtype=np.float64)
    assert arr.shape == (20, 20)
    assert np.abs(arr[5:-5, 5:-5] - 127.5).max() < 8


def test_resize_long_side_can_upscale_and_keeps_thin_images_visible() -> None:
    img = Image.fromarray(CHELSEA)
    assert resize_long_side(img, 902).size == (902, 600)
    assert resize_long_side(Image.new("RGB", (1000, 2)), 10).size == (10, 1)


@pytest.mark.parametrize("side", [0, -1, 1.5, True])
def test_resize_rejects_bad_sides(side: object) -> None:
    img = Image.new("RGB", (10, 10))
    with pytest.raises(ConfigError):
        resize_max_side(img, side)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        resize_long_side(img, side)  # type: ignore[arg-type]


def test_crop_bbox_inside_matches_pillow() -> None:
    img = Image.fromarray(CHELSEA)
    out = crop_bbox(img, (10, 20, 110, 70))
    assert out.size == (100, 50)
    assert np.array_equal(np.asarray(out), CHELSEA[20:70, 10:110])
    box = (10.4, 10.6, 20.5, 30.2)
    assert np.array_equal(np.asarray(crop_bbox(img, box)), np.asarray(img.crop(box)))


@pytest.mark.parametrize(
    ("bbox", "expected"),
    [((-50, -50, 100, 100), (0, 0, 100, 100)), ((400, 250, 1000, 1000), (400, 250, 451, 300))],
)
def test_crop_bbox_is_clipped_to_the_image(
    bbox: tuple[float, float, float, float], expected: tuple[int, int, int, int]
) -> None:
    out = np.asarray(crop_bbox(Image.fromarray(CHELSEA), bbox))
    x0, y0, x1, y1 = expected
    assert np.array_equal(out, CHELSEA[y0:y1, x0:x1])


@pytest.mark.parametrize(
    "bbox",
    [
        (10, 10, 10, 20),
        (20, 10, 10, 20),
        (10, 20, 20, 10),
        (float("nan"), 0, 10, 10),
        (0, 0, float("inf"), 10),
        (500, 500, 600, 600),
        (-20, -20, -5, -5),
        (10.1, 10.1, 10.3, 10.3),
        (0, 0, 10),
    ],
)
def test_crop_bbox_rejects_empty_or_invalid_boxes(bbox: tuple[float, ...]) -> None:
    with pytest.raises(ConfigError):
        crop_bbox(Image.fromarray(CHELSEA), bbox)


@pytest.mark.skipif(not HAS_HEIF, reason="pillow-heif missing")
def test_the_library_registers_the_heif_opener_itself(corpus: dict[str, Path]) -> None:
    # In this process skimage's imageio has already registered pillow-heif, so check in a fresh one.
    code = (
        "import sys; from PIL import Image; from lookalike.images import load_image;"
        "assert 'HEIF' not in Image.OPEN, 'registered at import';"
        "print(*load_image(sys.argv[1]).size)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(corpus["photo.heic"])], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["451", "300"]
