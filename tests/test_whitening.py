"""Whitening: statistical properties, a step-by-step re-implementation, and the file format."""

from __future__ import annotations

import logging
import zipfile

import numpy as np
import pytest

from lookalike.errors import ConfigError, WhiteningError
from lookalike.whitening import (
    Whitening,
    fit_learned_whitening,
    fit_pca_whitening,
    load_whitening,
    save_whitening,
)


def random_rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


def gaussian(n: int, scales: np.ndarray, rng: np.random.Generator, offset: float = 3.0) -> tuple:
    """Samples with covariance Q diag(scales²) Qᵀ around a non-zero mean, and Q."""
    q = random_rotation(len(scales), rng)
    x = (rng.standard_normal((n, len(scales))) * scales) @ q.T + offset
    return x.astype(np.float32), q


def align_signs(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``b`` with each row's sign flipped to agree with the same row of ``a``."""
    return b * np.sign(np.sum(a * b, axis=1, keepdims=True))


# ---- PCA-whitening ---------------------------------------------------------------------------------------


def test_pca_whitened_training_descriptors_have_identity_covariance():
    rng = np.random.default_rng(0)
    x, _ = gaussian(20000, np.geomspace(20, 0.5, 10), rng)
    for dim in (None, 6):
        w = fit_pca_whitening(x, dim=dim)
        y = (x.astype(np.float64) - w.mean) @ w.projection.T.astype(np.float64)
        np.testing.assert_allclose(y.mean(axis=0), 0, atol=1e-4)
        np.testing.assert_allclose(y.T @ y / len(y), np.eye(dim or 10), atol=1e-4)


def test_pca_reduction_keeps_the_top_variance_directions():
    rng = np.random.default_rng(1)
    scales = np.array([10.0, 8, 6, 4, 2, 1, 0.5, 0.25])
    x, q = gaussian(50000, scales, rng)
    w = fit_pca_whitening(x, dim=3)
    assert (w.dim, w.input_dim) == (3, 8)
    unit_rows = w.projection / np.linalg.norm(w.projection, axis=1, keepdims=True)
    np.testing.assert_allclose(np.abs(np.sum(unit_rows * q[:, :3].T, axis=1)), 1, atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(w.projection, axis=1), 1 / scales[:3], rtol=2e-2)
    np.testing.assert_array_equal(fit_pca_whitening(x).reduce(3).projection, w.projection)


def test_pca_on_fewer_samples_than_dimensions_stays_finite(caplog):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((5, 20)).astype(np.float32)
    floor = 1e-4
    with caplog.at_level(logging.WARNING, logger="lookalike.whitening"):
        w = fit_pca_whitening(x, eig_floor=floor)
    assert "raised" in caplog.text
    assert np.isfinite(w.projection).all()
    centred = x - x.mean(axis=0)
    largest = np.linalg.eigvalsh(centred.T @ centred / len(x)).max()
    assert np.linalg.norm(w.projection, axis=1).max() <= 1.001 / np.sqrt(floor * largest)
    y = w.apply(rng.standard_normal((3, 20)))
    assert np.isfinite(y).all()


def test_apply_returns_l2_normalised_float32_rows():
    rng = np.random.default_rng(3)
    x, _ = gaussian(500, np.geomspace(5, 1, 6), rng)
    w = fit_pca_whitening(x, dim=4)
    y = w.apply(x[:7].astype(np.float64))
    assert y.dtype == np.float32 and y.shape == (7, 4)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, rtol=1e-6)
    expected = (x[:7] - w.mean) @ w.projection.T
    np.testing.assert_allclose(y, expected / np.linalg.norm(expected, axis=1, keepdims=True), rtol=1e-5)


# ---- learned whitening -----------------------------------------------------------------------------------


def clustered(rng: np.random.Generator, q: np.ndarray, centres: np.ndarray, per_class: int) -> tuple:
    """Descriptors of classes living in 4 directions, with a shared high-variance nuisance in 2 more
    directions and weak isotropic noise in all 24; returns descriptors and class labels."""
    k, d = len(centres), q.shape[0]
    labels = np.repeat(np.arange(k), per_class)
    nuisance = rng.standard_normal((len(labels), 2)) * 5.0
    noise = rng.standard_normal((len(labels), d)) * 0.3
    x = centres[labels] @ q[:, :4].T + nuisance @ q[:, 4:6].T + noise + 1.0
    return x.astype(np.float32), labels


def match_ratio(y: np.ndarray, labels: np.ndarray) -> float:
    """Mean distance between matching descriptors over mean distance between non-matching ones."""
    dist = np.linalg.norm(y[:, None] - y[None], axis=-1)
    same = labels[:, None] == labels[None]
    off_diagonal = ~np.eye(len(y), dtype=bool)
    return float(dist[same & off_diagonal].mean() / dist[~same].mean())


def test_learned_whitening_pulls_matching_pairs_together():
    rng = np.random.default_rng(4)
    q = random_rotation(24, rng)
    centres = rng.standard_normal((40, 4))
    train, labels = clustered(rng, q, centres, per_class=6)
    pairs = np.array(
        [(i, j) for i in range(len(train)) for j in range(i + 1, len(train)) if labels[i] == labels[j]]
    )
    test, test_labels = clustered(rng, q, centres, per_class=3)  # fresh nuisance and noise

    def l2(v):
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    ratios = {
        "raw": match_ratio(l2(test), test_labels),
        "pca": match_ratio(fit_pca_whitening(train).apply(test), test_labels),
        "pca-4": match_ratio(fit_pca_whitening(train, dim=4).apply(test), test_labels),
        "learned": match_ratio(fit_learned_whitening(train, pairs).apply(test), test_labels),
        "learned-4": match_ratio(fit_learned_whitening(train, pairs, dim=4).apply(test), test_labels),
    }
    assert ratios["learned"] < 0.8 * min(ratios["raw"], ratios["pca"]), ratios  # all dimensions kept
    assert ratios["learned-4"] < 0.5 * ratios["pca-4"], ratios  # the 4 best dimensions kept
    assert ratios["learned-4"] < ratios["learned"], ratios


def inverse_sqrt(c: np.ndarray) -> np.ndarray:
    """C^(-1/2) by scipy's sqrtm when available, else by Denman–Beavers iteration."""
    try:
        from scipy.linalg import sqrtm
    except ImportError:
        y, z = c.copy(), np.eye(len(c))
        for _ in range(100):
            y, z = (y + np.linalg.inv(z)) / 2, (z + np.linalg.inv(y)) / 2
        return z
    return np.linalg.inv(np.real(sqrtm(c)))


def naive_learned_whitening(x, pairs, dim, whiten=inverse_sqrt):
    """Radenović et al.'s learned whitening step by step, with loops over descriptors and pairs."""
    x = x.astype(np.float64)
    n, d = x.shape
    mean = sum(x) / n
    c_s = np.zeros((d, d))
    for i, j in pairs:
        c_s += np.outer(x[i] - x[j], x[i] - x[j])
    w = whiten(c_s / len(pairs))
    c_d = np.zeros((d, d))
    for row in x:
        c_d += np.outer(w @ (row - mean), w @ (row - mean))
    values, vectors = np.linalg.eig(c_d)
    order = np.argsort(values.real)[::-1]
    return mean, vectors.real[:, order[:dim]].T @ w


def inverse_cholesky(c: np.ndarray) -> np.ndarray:
    """The whitening cirtorch uses: the inverse of the lower Cholesky factor, L⁻¹ C L⁻ᵀ = I."""
    return np.linalg.inv(np.linalg.cholesky(c))


@pytest.mark.parametrize("whiten", [inverse_sqrt, inverse_cholesky], ids=["sqrtm", "cholesky"])
@pytest.mark.parametrize("dim", [None, 5])
def test_learned_whitening_matches_step_by_step_version(whiten, dim):
    rng = np.random.default_rng(5)
    x, _ = gaussian(400, np.geomspace(4, 0.5, 12), rng)
    pairs = rng.integers(0, len(x), size=(300, 2))
    x[pairs[:, 1]] = x[pairs[:, 0]] + 0.3 * rng.standard_normal((300, 12)).astype(np.float32)
    mean, projection = naive_learned_whitening(x, pairs, dim, whiten)
    w = fit_learned_whitening(x, pairs, dim=dim)
    assert w.kind == "learned" and w.dim == (dim or 12)
    np.testing.assert_allclose(w.mean, mean, rtol=1e-6, atol=1e-6)
    scale = np.abs(projection).max()
    np.testing.assert_allclose(align_signs(projection, w.projection), projection, atol=1e-5 * scale)


def test_learned_whitening_makes_matching_differences_white():
    rng = np.random.default_rng(6)
    x, _ = gaussian(300, np.geomspace(3, 0.3, 8), rng)
    pairs = rng.integers(0, len(x), size=(500, 2))
    w = fit_learned_whitening(x, pairs)
    diffs = (x[pairs[:, 0]] - x[pairs[:, 1]]).astype(np.float64) @ w.projection.T
    np.testing.assert_allclose(diffs.T @ diffs / len(pairs), np.eye(8), atol=1e-4)


@pytest.mark.parametrize(
    "pairs",
    [
        np.zeros((0, 2), dtype=int),
        np.array([[0, 1, 2]]),
        np.array([[0.0, 1.0]]),
        np.array([[0, 10]]),
        np.array([[-1, 0]]),
    ],
    ids=["empty", "three-columns", "float", "out-of-range", "negative"],
)
def test_learned_whitening_rejects_bad_pairs(pairs):
    x = np.random.default_rng(7).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(WhiteningError):
        fit_learned_whitening(x, pairs)


def test_constant_descriptors_or_identical_pairs_are_refused():
    x = np.random.default_rng(7).standard_normal((10, 4)).astype(np.float32)
    with pytest.raises(WhiteningError, match="do not vary"):
        fit_pca_whitening(np.ones((10, 4)))
    with pytest.raises(WhiteningError, match="do not vary"):
        fit_learned_whitening(x, np.array([[0, 0], [3, 3]]))


# ---- validation --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "x",
    [
        np.ones((1, 4)),
        np.ones(4),
        np.array([[1.0, np.nan], [0.0, 1.0]]),
        np.array([[1.0, np.inf], [0, 1]]),
        np.ones((5, 0)),
    ],
    ids=["one-sample", "1-d", "nan", "inf", "no-dimensions"],
)
def test_fitting_rejects_unusable_descriptors(x):
    with pytest.raises(WhiteningError):
        fit_pca_whitening(x)
    with pytest.raises(WhiteningError):
        fit_learned_whitening(x, np.array([[0, 0]]))


@pytest.mark.parametrize(("dim", "eig_floor"), [(0, 1e-6), (5, 1e-6), (2, 0.0), (2, 1.0)])
def test_fitting_rejects_bad_options(dim, eig_floor):
    x = np.random.default_rng(8).standard_normal((10, 4))
    with pytest.raises(ConfigError):
        fit_pca_whitening(x, dim=dim, eig_floor=eig_floor)


def test_whitening_validates_and_freezes_its_arrays():
    mean, projection = np.zeros(4), np.eye(4)[:2]
    with pytest.raises(WhiteningError):
        Whitening(np.zeros(3), projection, "pca")
    with pytest.raises(WhiteningError):
        Whitening(mean, projection, "zca")
    with pytest.raises(WhiteningError):
        Whitening(mean, projection * np.nan, "pca")
    w = Whitening(mean, projection, "pca")
    assert w.mean.dtype == w.projection.dtype == np.float32
    projection[0, 0] = 5.0  # the caller's array is copied
    assert w.projection[0, 0] == 1.0
    with pytest.raises(ValueError):
        w.projection[0, 0] = 5.0
    with pytest.raises(WhiteningError):
        w.apply(np.ones((2, 3)))
    with pytest.raises(ConfigError):
        w.reduce(3)


# ---- files -------------------------------------------------------------------------------------------------


def fitted() -> Whitening:
    x, _ = gaussian(200, np.geomspace(4, 1, 6), np.random.default_rng(9))
    return fit_pca_whitening(x, dim=4)


def test_save_load_round_trip(tmp_path):
    w = fitted()
    path = tmp_path / "whitening.npz"
    save_whitening(w, path)
    save_whitening(w.reduce(2), path)  # overwriting replaces the file
    loaded = load_whitening(path)
    assert (loaded.kind, loaded.dim, loaded.input_dim) == ("pca", 2, 6)
    np.testing.assert_array_equal(loaded.mean, w.mean)
    np.testing.assert_array_equal(loaded.projection, w.projection[:2])
    assert [p.name for p in tmp_path.iterdir()] == ["whitening.npz"]  # no temporary files left


def test_save_uses_the_path_as_given(tmp_path):
    save_whitening(fitted(), tmp_path / "lw")
    assert [p.name for p in tmp_path.iterdir()] == ["lw"]
    assert load_whitening(tmp_path / "lw").dim == 4


def write_npz(path, **arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def valid_arrays() -> dict:
    w = fitted()
    return {"version": np.array(1), "kind": np.array("learned"), "mean": w.mean, "projection": w.projection}


@pytest.mark.parametrize(
    "change",
    [
        {"mean": np.zeros(5, dtype=np.float32)},
        {"projection": np.zeros((4, 6), dtype=np.int32)},
        {"kind": np.array("zca")},
        {"kind": np.array(b"pca")},
        {"version": np.array(2)},
    ],
    ids=["shape-mismatch", "integer-projection", "unknown-kind", "bytes-kind", "future-version"],
)
def test_load_rejects_inconsistent_files(tmp_path, change):
    path = tmp_path / "w.npz"
    write_npz(path, **{**valid_arrays(), **change})
    with pytest.raises(WhiteningError):
        load_whitening(path)


def test_load_rejects_missing_arrays(tmp_path):
    arrays = valid_arrays()
    del arrays["projection"]
    write_npz(tmp_path / "w.npz", **arrays)
    with pytest.raises(WhiteningError, match="missing projection"):
        load_whitening(tmp_path / "w.npz")


def test_load_refuses_object_arrays(tmp_path):
    arrays = valid_arrays()
    arrays["mean"] = np.array(list(arrays["mean"]), dtype=object)  # stored with pickle
    write_npz(tmp_path / "w.npz", **arrays)
    with pytest.raises(WhiteningError):
        load_whitening(tmp_path / "w.npz")


def test_load_rejects_corrupt_and_foreign_files(tmp_path):
    good = tmp_path / "good.npz"
    save_whitening(fitted(), good)
    data = good.read_bytes()

    (tmp_path / "truncated.npz").write_bytes(data[: len(data) // 2])
    (tmp_path / "garbage.npz").write_bytes(b"\x00\x01 not a numpy file at all " * 20)
    (tmp_path / "empty.npz").write_bytes(b"")
    np.save(tmp_path / "single.npy", np.eye(3))
    flipped = bytearray(data)
    flipped[len(flipped) // 3] ^= 0xFF  # a bit flip inside an array, caught by the zip CRC
    (tmp_path / "flipped.npz").write_bytes(bytes(flipped))
    with zipfile.ZipFile(tmp_path / "text.npz", "w") as z:
        z.writestr("mean.npy", "hello")

    for name in (
        "truncated.npz",
        "garbage.npz",
        "empty.npz",
        "single.npy",
        "flipped.npz",
        "text.npz",
        "absent.npz",
    ):
        with pytest.raises(WhiteningError):
            load_whitening(tmp_path / name)
