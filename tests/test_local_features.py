"""Local features (lookalike.local): the compact stored form, the working image, mutual-nearest matching and
the geometric fit against naive loops and synthetic transforms with known answers; XFeat and RootSIFT on
real photos (keypoints in bounds, unit descriptors, an edited copy found, an unrelated photo not)."""

from __future__ import annotations

import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import ConfigError, WeightsNotAvailableError
from lookalike.images import load_image
from lookalike.local import LocalDescriber, LocalFeatures, SiftDescriber, local_describer, working_image
from lookalike.local.cache import FileLocalFeatures, MemoryCache
from lookalike.local.geometry import Model, fit, plausible, reprojection_inliers
from lookalike.local.matching import mutual_nearest
from lookalike.local.sift import root_sift
from lookalike.rerank import verify_pair
from tests.conftest import SAMPLE, SHARED_DATA, require_weights, unit_rows

HOLIDAYS = SHARED_DATA / "holidays-sample"
CALTECH = SHARED_DATA / "caltech101"
# Unrelated to the Holidays landscape and to the sample photos: other scenes and objects.
UNRELATED = [
    CALTECH / "Leopards" / "image_0001.jpg",
    CALTECH / "Faces" / "image_0001.jpg",
    CALTECH / "pagoda" / "image_0001.jpg",
]
DESCRIBERS = ["sift", pytest.param("xfeat", marks=pytest.mark.weights)]


def edited(image: Image.Image, degrees: float = 15.0, scale: float = 0.7) -> Image.Image:
    """A copy of ``image`` rotated by ``degrees``, scaled by ``scale`` and cropped by a tenth on each side."""
    rotated = image.convert("RGB").rotate(degrees, resample=Image.Resampling.BICUBIC)
    small = rotated.resize(
        (round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS
    )
    w, h = small.size
    return small.crop((w // 10, h // 10, w - w // 10, h - h // 10))


def flat_grey(size: tuple[int, int] = (300, 200)) -> Image.Image:
    return Image.new("RGB", size, (128, 128, 128))


def describer_named(name: str, max_keypoints: int = 1024) -> LocalDescriber:
    if name == "xfeat":
        require_weights("xfeat.verlab")
    return local_describer(name, max_keypoints)


def random_features(
    n: int, dim: int = 64, seed: int = 0, size: tuple[int, int] = (640, 480)
) -> LocalFeatures:
    rng = np.random.default_rng(seed)
    keypoints = (rng.random((n, 2)) * size).astype(np.float32)
    descriptors = unit_rows(n, dim, seed).astype(np.float16) if n else np.zeros((0, dim), np.float16)
    return LocalFeatures(keypoints, descriptors, rng.random(n).astype(np.float32), size)


# -- the stored form -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "dim"), [(300, 64), (1, 128), (0, 64)])
def test_bytes_round_trip_exactly(n: int, dim: int) -> None:
    features = random_features(n, dim, seed=n, size=(637, 421))
    back = LocalFeatures.from_bytes(features.to_bytes())
    assert back.size == (637, 421)
    assert (back.keypoints.dtype, back.descriptors.dtype, back.scores.dtype) == (
        np.float32,
        np.float16,
        np.float32,
    )
    np.testing.assert_array_equal(back.keypoints, features.keypoints)
    np.testing.assert_array_equal(back.descriptors, features.descriptors)
    np.testing.assert_array_equal(back.scores, features.scores)
    assert back.descriptors.shape == (n, dim)
    assert len(features.to_bytes()) == 19 + n * (8 + 4 + 2 * dim) + 4  # header, body, crc: compact


def test_every_flipped_byte_is_a_value_error() -> None:
    data = random_features(20, 64).to_bytes()
    for at in range(len(data)):
        damaged = bytearray(data)
        damaged[at] ^= 0x10
        with pytest.raises(ValueError, match="damaged"):
            LocalFeatures.from_bytes(bytes(damaged))


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


def test_a_wrong_length_is_a_value_error() -> None:
    data = random_features(20, 64).to_bytes()
    for wrong in (data[:-1], data + b"\0", data[:10], b"", data[:-4] + data[:-4]):
        with pytest.raises(ValueError):
            LocalFeatures.from_bytes(wrong)
    # a checksum that agrees, over a header that promises more keypoints than the body holds
    body = bytearray(data[:-4])
    body[5:9] = struct.pack("<I", 21)
    with pytest.raises(ValueError, match="wrong length"):
        LocalFeatures.from_bytes(with_crc(bytes(body)))
    # one keypoint fewer in the body than the header says (a cut body, re-checksummed)
    with pytest.raises(ValueError, match="wrong length"):
        LocalFeatures.from_bytes(with_crc(data[: -4 - 140]))


def test_foreign_bytes_are_a_value_error() -> None:
    body = bytearray(random_features(5, 64).to_bytes()[:-4])
    for at, value in ((0, ord("X")), (4, 2)):  # another magic; another version
        foreign = bytearray(body)
        foreign[at] = value
        with pytest.raises(ValueError, match="not stored local features"):
            LocalFeatures.from_bytes(with_crc(bytes(foreign)))


def test_strongest_keeps_the_highest_scores_in_order_ties_in_place() -> None:
    features = random_features(50, 16, seed=3)
    scores = np.round(features.scores * 8).astype(np.float32) / 8  # many ties
    features = LocalFeatures(features.keypoints, features.descriptors, scores, features.size)
    for n in (1, 7, 50, 80):
        top = features.strongest(n)
        expected = sorted(range(50), key=lambda i: (-float(scores[i]), i))[:n]
        np.testing.assert_array_equal(top.scores, scores[expected])
        np.testing.assert_array_equal(top.keypoints, features.keypoints[expected])
        np.testing.assert_array_equal(top.descriptors, features.descriptors[expected])
        assert top.size == features.size
    assert len(features.strongest(0)) == 0


def test_features_refuse_mismatched_arrays() -> None:
    good = random_features(4, 8)
    with pytest.raises(ValueError):
        LocalFeatures(good.keypoints[:3], good.descriptors, good.scores, good.size)
    with pytest.raises(ValueError):
        LocalFeatures(good.keypoints, good.descriptors, good.scores[:, None], good.size)
    with pytest.raises(ValueError):
        LocalFeatures(good.keypoints[:, :1], good.descriptors, good.scores, good.size)


# -- the working image -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "max_size", "multiple"),
    [
        ((3264, 2448), 640, 1),
        ((3264, 2448), 640, 32),
        ((2448, 3264), 640, 32),
        ((641, 100), 640, 1),
        ((641, 100), 640, 32),
        ((300, 200), 640, 1),
        ((300, 200), 640, 32),
        ((640, 480), 640, 32),
        ((1000, 999), 64, 32),
        ((5000, 37), 640, 8),
    ],
)
def test_working_image_is_grey_resized_and_of_multiples(
    size: tuple[int, int], max_size: int, multiple: int
) -> None:
    grey = working_image(Image.new("RGB", size, (10, 200, 30)), max_size, multiple)
    width, height = grey.size
    assert grey.mode == "L"
    assert max(grey.size) <= max_size
    assert width % multiple == 0 and height % multiple == 0
    assert width >= multiple and height >= multiple
    # resized (shrunk or enlarged) to the long side, the aspect kept to a multiple
    scale = max_size / max(size)
    assert abs(width - size[0] * scale) <= multiple and abs(height - size[1] * scale) <= multiple
    assert max(grey.size) > max_size - multiple or min(width, height) == multiple
    if multiple == 1 and max(size) == max_size:
        assert grey.size == size


def test_working_image_refuses_an_image_without_pixels() -> None:
    from lookalike.errors import ImageError

    with pytest.raises(ImageError):
        working_image(Image.new("RGB", (0, 0)), 640)


# -- matching --------------------------------------------------------------------------------------------


def naive_mutual_nearest(a: np.ndarray, b: np.ndarray, min_similarity: float, ratio: float) -> set:
    """Every pair looked at one by one: each other's nearest, alike enough, and (ratio < 1, b of more than one
    row) nearer than ``ratio`` × the distance to a's second nearest in b."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    found = set()
    for i in range(len(a)):
        sims = [float(a[i] @ b[j]) for j in range(len(b))]
        j = max(range(len(b)), key=lambda m: (sims[m], -m))
        back = max(range(len(a)), key=lambda m: (float(a[m] @ b[j]), -m))
        if back != i or sims[j] < min_similarity:
            continue
        if ratio < 1 and len(b) > 1:
            second = sorted(sims)[-2]
            if not np.sqrt(max(2 - 2 * sims[j], 0)) < ratio * np.sqrt(max(2 - 2 * second, 0)):
                continue
        found.add((i, j))
    return found


@pytest.mark.parametrize("min_similarity", [-1.0, 0.2, 0.45])
@pytest.mark.parametrize("ratio", [1.0, 0.95, 0.8])
def test_mutual_nearest_equals_the_double_loop(min_similarity: float, ratio: float) -> None:
    rng = np.random.default_rng(0)
    a = unit_rows(60, 8, seed=1)
    b = np.vstack([a[:30] + 0.3 * rng.standard_normal((30, 8)), unit_rows(50, 8, seed=2)])
    b = (b / np.linalg.norm(b, axis=1, keepdims=True)).astype(np.float32)
    matches = mutual_nearest(a, b, min_similarity, ratio)
    assert matches.dtype == np.int64 and matches.shape[1] == 2
    assert {tuple(m) for m in matches.tolist()} == naive_mutual_nearest(a, b, min_similarity, ratio)
    assert len(matches) > 3  # the case is not empty


def test_mutual_nearest_of_float16_descriptors_and_a_single_row() -> None:
    a, b = unit_rows(40, 16, seed=4).astype(np.float16), unit_rows(30, 16, seed=5).astype(np.float16)
    expected = naive_mutual_nearest(a.astype(np.float32), b.astype(np.float32), 0.0, 0.9)
    assert {tuple(m) for m in mutual_nearest(a, b, 0.0, 0.9).tolist()} == expected
    assert mutual_nearest(a, b[:1], ratio=0.5).tolist() == [
        list(m) for m in naive_mutual_nearest(a, b[:1], -1.0, 0.5)
    ]


@pytest.mark.parametrize(("na", "nb"), [(0, 5), (5, 0), (0, 0)])
def test_mutual_nearest_of_nothing_is_no_match(na: int, nb: int) -> None:
    a, b = np.zeros((na, 64), np.float16), np.zeros((nb, 64), np.float16)
    matches = mutual_nearest(a, b, 0.0, 0.8)
    assert matches.shape == (0, 2) and matches.dtype == np.int64


def test_root_sift_rows_are_unit_and_their_product_is_the_hellinger_kernel() -> None:
    histograms = np.random.default_rng(0).integers(0, 200, (5, 128)).astype(np.float32)
    rooted = root_sift(histograms)
    np.testing.assert_allclose(np.linalg.norm(rooted, axis=1), 1.0, atol=1e-6)
    p = histograms / histograms.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(rooted @ rooted.T, np.sqrt(p) @ np.sqrt(p).T, atol=1e-6)


# -- geometry --------------------------------------------------------------------------------------------

TRUTH = {
    "homography": np.array([[0.9, -0.2, 30.0], [0.15, 1.1, -12.0], [1e-4, -2e-4, 1.0]]),
    "affine": np.array([[0.8, -0.3, 40.0], [0.25, 0.9, 15.0], [0.0, 0.0, 1.0]]),
}


def project(transform: np.ndarray, points: np.ndarray) -> np.ndarray:
    h = np.hstack([points, np.ones((len(points), 1))]) @ transform.T
    return h[:, :2] / h[:, 2:]


def half_outliers(model: Model, seed: int, n: int = 200) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Points of a, their images under the true transform (half replaced by random points), which are true."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0, 640, (n, 2))
    b = project(TRUTH[model], a) + rng.normal(0, 0.5, (n, 2))
    true = np.ones(n, bool)
    true[rng.permutation(n)[: n // 2]] = False
    b[~true] = rng.uniform(0, 640, ((~true).sum(), 2))
    return a, b, true


@pytest.mark.parametrize("model", ["homography", "affine"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fit_finds_the_true_transform_among_half_outliers(model: Model, seed: int) -> None:
    a, b, true = half_outliers(model, seed)
    found = fit(a, b, model)
    assert found.matches == len(a)
    # the inliers are the true matches, give or take an outlier that lands near its true place by chance
    assert true.sum() <= found.inliers <= true.sum() + 3
    assert found.transform is not None
    grid = np.stack(np.meshgrid(np.linspace(0, 640, 9), np.linspace(0, 640, 9)), -1).reshape(-1, 2)
    assert np.abs(project(found.transform, grid) - project(TRUTH[model], grid)).max() < 1.5
    explained = reprojection_inliers(found.transform, a, b, 6.0)
    assert explained[true].mean() > 0.99 and explained[~true].sum() <= 3


def test_fit_is_reproducible() -> None:
    a, b, _ = half_outliers("homography", 4)
    first, second = fit(a, b), fit(a, b)
    assert first.inliers == second.inliers
    np.testing.assert_array_equal(first.transform, second.transform)


@pytest.mark.parametrize(("model", "n"), [("homography", 0), ("homography", 3), ("affine", 2)])
def test_fewer_matches_than_the_model_needs_explain_nothing(model: Model, n: int) -> None:
    a, b, _ = half_outliers(model, 0, n=10)
    found = fit(a[:n], b[:n], model)
    assert (found.inliers, found.matches, found.transform) == (0, n, None)


def collinear(seed: int, n: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """Matches all on one line in both images (an edge, a horizon): no plane-to-plane map is determined."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(0, 600, n)
    line = np.stack([x, rng.uniform(-2, 2) * x + rng.uniform(0, 100)], axis=1)
    return line, line * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20, 2)


@pytest.mark.parametrize("model", ["homography", "affine"])
@pytest.mark.parametrize("seed", range(6))
def test_collinear_matches_explain_nothing(model: Model, seed: int) -> None:
    a, b = collinear(seed)
    assert fit(a, b, model).inliers == 0


@pytest.mark.parametrize("model", ["homography", "affine"])
def test_identical_points_explain_nothing(model: Model) -> None:
    same = np.full((30, 2), 100.0)
    assert fit(same, same + 5, model).inliers == 0
    two = np.vstack([np.full((15, 2), 100.0), np.full((15, 2), 300.0)])
    assert fit(two, two + 5, model).inliers == 0
    nan = np.full((30, 2), np.nan)
    assert fit(nan, nan, model).inliers == 0


def rotation(degrees: float, scale: float = 1.0) -> np.ndarray:
    c, s = np.cos(np.radians(degrees)) * scale, np.sin(np.radians(degrees)) * scale
    return np.array([[c, -s, 10.0], [s, c, -5.0], [0.0, 0.0, 1.0]])


def test_plausible_rejects_mirrors_blow_ups_and_the_non_finite() -> None:
    mirror = np.diag([-1.0, 1.0, 1.0])
    for bad in (
        mirror,
        rotation(30) @ mirror,
        np.diag([100.0, 100.0, 1.0]),
        np.diag([0.01, 0.01, 1.0]),
        np.diag([100.0, 1.0, 1.0]),
        np.diag([1.0, 1.0, 0.0]),
        np.full((3, 3), np.nan),
        np.diag([1.0, np.inf, 1.0]),
    ):
        assert not plausible(bad), bad
    for good in (np.eye(3), rotation(30, 2.0), rotation(-170, 0.2), TRUTH["homography"], 3.0 * np.eye(3)):
        assert plausible(good), good
    assert plausible(np.diag([50.0, 1.0, 1.0]), max_scale=10)  # the area, not a side, is bounded


def test_fit_rejects_a_mirrored_or_blown_up_match() -> None:
    a = np.random.default_rng(0).uniform(0, 640, (200, 2))
    b = project(TRUTH["homography"], a)
    mirrored = np.stack([640 - b[:, 0], b[:, 1]], axis=1)
    assert fit(a, b).inliers == 200  # the same points unmirrored: all explained
    assert fit(a, mirrored).inliers == 0
    assert fit(a, mirrored, "affine").inliers == 0
    assert fit(a, a * 100.0).inliers == 0
    assert fit(a, a * 100.0, "affine").inliers == 0


def test_reprojection_inliers_equal_the_loop() -> None:
    rng = np.random.default_rng(5)
    a = rng.uniform(0, 640, (300, 2))
    b = project(TRUTH["homography"], a) + rng.normal(0, 4, (300, 2))
    for threshold in (1.0, 4.0, 6.0):
        naive = []
        for (x, y), (u, v) in zip(a, b, strict=True):
            p, q, w = TRUTH["homography"] @ np.array([x, y, 1.0])
            naive.append(np.hypot(p / w - u, q / w - v) <= threshold)
        np.testing.assert_array_equal(reprojection_inliers(TRUTH["homography"], a, b, threshold), naive)


# -- describers on real photos ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def holidays_photo() -> Image.Image:
    return load_image(HOLIDAYS / "100000.jpg")


@pytest.mark.parametrize("name", DESCRIBERS)
@pytest.mark.parametrize("max_keypoints", [1024, 100])
def test_features_of_a_real_photo(name: str, max_keypoints: int, holidays_photo: Image.Image) -> None:
    describer = describer_named(name, max_keypoints)
    features = describer.describe(holidays_photo)
    width, height = features.size
    assert features.size == working_image(holidays_photo, 640, 32 if name == "xfeat" else 1).size
    assert max(features.size) <= 640
    assert max_keypoints // 2 < len(features) <= max_keypoints  # a detailed landscape fills the budget
    x, y = features.keypoints[:, 0], features.keypoints[:, 1]
    assert (x >= 0).all() and (x < width).all() and (y >= 0).all() and (y < height).all()
    assert features.descriptors.dtype == np.float16
    assert features.descriptors.shape[1] == {"sift": 128, "xfeat": 64}[name]
    norms = np.linalg.norm(features.descriptors.astype(np.float32), axis=1)
    np.testing.assert_allclose(norms, 1.0, atol=2e-3)
    assert (np.diff(features.scores) <= 0).all() and (features.scores > 0).all()
    assert features.keypoints.dtype == features.scores.dtype == np.float32


@pytest.mark.parametrize("name", DESCRIBERS)
def test_describers_are_deterministic(name: str, holidays_photo: Image.Image) -> None:
    describer = describer_named(name)
    first, again = describer.describe(holidays_photo), describer.describe(holidays_photo.copy())
    np.testing.assert_array_equal(first.keypoints, again.keypoints)
    np.testing.assert_array_equal(first.descriptors, again.descriptors)
    np.testing.assert_array_equal(first.scores, again.scores)
    assert first.to_bytes() == again.to_bytes()


@pytest.mark.parametrize("name", DESCRIBERS)
@pytest.mark.parametrize("size", [(300, 200), (7, 5), (1, 1), (2000, 20)])
def test_a_flat_grey_image_has_no_features(name: str, size: tuple[int, int]) -> None:
    describer = describer_named(name)
    features = describer.describe(flat_grey(size))
    assert len(features) == 0
    assert features.descriptors.shape == (0, {"sift": 128, "xfeat": 64}[name])
    assert LocalFeatures.from_bytes(features.to_bytes()).descriptors.shape == features.descriptors.shape
    # verifying against nothing is 0 inliers, either way round
    photo = describer.describe(load_image(SAMPLE / "astronaut.jpg"))
    assert verify_pair(features, photo).inliers == 0
    assert verify_pair(photo, features).inliers == 0


@pytest.mark.parametrize("name", DESCRIBERS)
@pytest.mark.parametrize(
    ("photo", "most_unrelated"),
    # a full-size photo: unrelated ones stay below sv's min_inliers (15). A small one (the edited copy's
    # working image is 192 × 128 for XFeat) leaves room for chance fits within 6 px: see the report.
    [(HOLIDAYS / "100000.jpg", 14), (SAMPLE / "motorcycle-left.jpg", 20)],
)
def test_an_edited_copy_is_matched_and_an_unrelated_photo_is_not(
    name: str, photo: Path, most_unrelated: int
) -> None:
    describer = describer_named(name)
    original = load_image(photo)
    copy = describer.describe(edited(original))
    found = verify_pair(copy, describer.describe(original))
    unrelated = [verify_pair(copy, describer.describe(load_image(p))).inliers for p in UNRELATED]
    assert found.inliers >= 30, found
    assert max(unrelated) <= most_unrelated and found.inliers >= 4 * max(unrelated), unrelated
    # the fitted map is the edit: about 15° of rotation and 0.7 of scale between the working images
    assert found.transform is not None
    linear = found.transform[:2, :2] / found.transform[2, 2]
    angle = np.degrees(np.arctan2(linear[1, 0] - linear[0, 1], linear[0, 0] + linear[1, 1]))
    assert abs(abs(angle) - 15) < 3, angle


# -- choosing a describer --------------------------------------------------------------------------------


def test_local_describer_checks_its_arguments_and_shares_describers() -> None:
    for name, keypoints, size in (("orb", 1024, 640), ("sift", 8, 640), ("sift", 1024, 32)):
        with pytest.raises(ConfigError):
            local_describer(name, keypoints, size)
    assert local_describer("SIFT", 512, 320) is local_describer("sift", 512, 320)
    assert local_describer("sift", 512, 320) == SiftDescriber(512, 320)
    identities = {SiftDescriber(k, s).identity for k in (512, 1024) for s in (320, 640)}
    assert len(identities) == 4


def test_auto_falls_back_to_sift_without_xfeat_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    import lookalike.local as local_module

    def no_weights(*args: object) -> None:
        raise WeightsNotAvailableError("xfeat.verlab: not cached, no network")

    monkeypatch.setattr(local_module, "_xfeat", no_weights)
    assert local_describer("auto", 1000, 999).name == "sift"  # arguments no other test asks for


@pytest.mark.weights
def test_auto_is_xfeat_when_its_weights_are_cached() -> None:
    require_weights("xfeat.verlab")
    describer = local_describer("auto")
    assert describer.name == "xfeat"
    assert describer.identity == local_describer("xfeat").identity
    assert describer.identity.startswith("xfeat:") and ":k512:w640:" in describer.identity


# -- features of files, kept ------------------------------------------------------------------------------


class Counting:
    """A describer that counts the images it describes (SIFT underneath)."""

    def __init__(self) -> None:
        self.inner, self.calls = local_describer("sift"), 0

    @property
    def name(self) -> str:
        return self.inner.name

    @property
    def identity(self) -> str:
        return self.inner.identity

    def describe(self, image: Image.Image) -> LocalFeatures:
        self.calls += 1
        return self.inner.describe(image)


def test_memory_cache_keeps_the_last_asked_for() -> None:
    cache, features = MemoryCache(keep=2), random_features(3)
    for key in ("a", "b", "c"):
        cache.put("sift", key, features)
    assert cache.get("sift", "a") is None and cache.get("sift", "b") is features
    cache.put("sift", "d", features)  # b was asked for last: c goes
    assert (cache.get("sift", "c"), cache.get("sift", "b")) == (None, features)
    assert cache.get("xfeat", "b") is None  # keyed by identity too


def test_file_local_features_are_described_once_and_kept_in_a_folder(tmp_path: Path) -> None:
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("cat.jpg", "rocket.jpg", "coffee.jpg"):
        shutil.copy2(SAMPLE / name, photos / name)
    paths = {
        1: photos / "cat.jpg",
        2: photos / "rocket.jpg",
        3: photos / "coffee.jpg",
        4: photos / "gone.jpg",
    }
    counting, folder = Counting(), tmp_path / "cache"
    first = FileLocalFeatures(lambda i: paths.get(i), folder)
    found = first.local_features([1, 2, 3, 4, 5, 1], counting)
    assert counting.calls == 3 and found[3] is None and found[4] is None and found[5] is found[0]
    assert len(list(folder.rglob("*.lf"))) == 3

    again = FileLocalFeatures(lambda i: paths.get(i), folder).local_features([3, 2, 1], counting)
    assert counting.calls == 3  # read from the folder
    assert [f and f.to_bytes() for f in again] == [f and f.to_bytes() for f in found[2::-1]]

    stat = paths[2].stat()  # a rewritten file is described anew
    os.utime(paths[2], ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    for kept in folder.rglob("*.lf"):  # and damaged kept files are not trusted
        kept.write_bytes(kept.read_bytes()[:-1])
    fresh = FileLocalFeatures(lambda i: paths.get(i), folder).local_features([1, 2, 3], counting)
    assert counting.calls == 6 and all(f is not None and len(f) > 0 for f in fresh)
    assert len(list(folder.rglob("*.lf"))) == 4  # the rewritten file's features kept beside the old ones
