"""Choosing a PCA-whitening for a collection's own descriptors (issue 11).

Plain PCA-whitening of N ≤ D descriptors keeping their N − 1 directions maps them onto a regular simplex: every
image scores −1/(N − 1) against every other. The default choice shrinks the eigenvalues so that at most one
direction per ten images is whitened. Here: the new maths against naive numpy, the collapse of the old rule,
and the property that matters — whitening a collection on itself never makes its own groups harder to find.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError, WhiteningError
from lookalike.evaluate.metrics import compute_map, rank_by_similarity
from lookalike.whitening import (
    IMAGES_PER_DIRECTION,
    MIN_PCA_SAMPLES,
    choose_pca,
    fit_chosen_pca_whitening,
    fit_pca_whitening,
    shrinkage_for_directions,
    shrunk_eigenvalues,
    whitened_directions,
)
from tests.conftest import SHARED_DATA, json_lines, run_cli, succeeded

# ---- helpers ---------------------------------------------------------------------------------------------


def l2n(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def group_map(y: np.ndarray, groups: np.ndarray) -> float:
    """mAP of every image that has group mates, ranked against all the others (itself excluded); the
    positives are its group mates. ``groups`` ``(N,)``: group ids, ``-1`` for distractors (never queries)."""
    queries = [i for i in range(len(y)) if groups[i] >= 0 and np.count_nonzero(groups == groups[i]) > 1]
    gnd = [
        {"ok": np.flatnonzero((groups == groups[q]) & (np.arange(len(y)) != q)), "junk": np.array([q])}
        for q in queries
    ]
    return compute_map(rank_by_similarity(y[queries] @ y.T), gnd).map


def old_rule(x: np.ndarray):
    """The rule this issue replaces: plain PCA-whitening keeping min(D, N − 1) components."""
    return fit_pca_whitening(x, dim=min(x.shape[1], len(x) - 1))


def off_diagonal(y: np.ndarray) -> np.ndarray:
    scores = y @ y.T
    return scores[~np.eye(len(y), dtype=bool)]


def spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centred data and the D covariance eigenvalues, descending, the slow obvious way."""
    centred = x.astype(np.float64) - x.mean(axis=0)
    return centred, np.sort(np.linalg.eigvalsh(centred.T @ centred / len(x)))[::-1]


def naive_shrunk_covariance(centred: np.ndarray, rho: float) -> np.ndarray:
    cov = centred.T @ centred / len(centred)
    return (1 - rho) * cov + rho * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])


def clustered(n: int, d: int = 2048, seed: int = 0, noise: float = 3.5, nuisance: float = 0.0):
    """``n`` L2-normalised vectors in groups of 4 (shuffled): a common non-negative mean, as CNN descriptors
    have, a random centre per group and isotropic noise; ``nuisance`` adds 16 directions shared by every
    vector (variance ``nuisance²`` per coordinate), the correlations PCA-whitening is meant to remove."""
    rng = np.random.default_rng(seed)
    k = -(-n // 4)
    groups = rng.permutation(np.repeat(np.arange(k), 4)[:n])
    weights = np.geomspace(4, 1, 16)
    shared = rng.standard_normal((16, d)) * (weights / np.linalg.norm(weights))[:, None] * nuisance
    x = (
        2 * np.abs(rng.standard_normal(d))
        + rng.standard_normal((k, d))[groups]
        + rng.standard_normal((n, 16)) @ shared
        + noise * rng.standard_normal((n, d))
    )
    return l2n(x).astype(np.float32), groups


# ---- the new maths against naive numpy ------------------------------------------------------------------


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.9, 1.0])
def test_shrunk_eigenvalues_are_those_of_the_shrunk_covariance(rho):
    x = np.random.default_rng(0).standard_normal((40, 7)) * np.geomspace(5, 0.1, 7)
    centred, values = spectrum(x)
    naive = np.sort(np.linalg.eigvalsh(naive_shrunk_covariance(centred, rho)))[::-1]
    np.testing.assert_allclose(shrunk_eigenvalues(values, rho), naive, rtol=1e-10, atol=1e-12)
    np.testing.assert_array_equal(shrunk_eigenvalues(values, 0.0), values)  # exactly: plain stays plain


@pytest.mark.parametrize(("n", "d"), [(40, 7), (9, 25)])
@pytest.mark.parametrize("rho", [0.2, 0.7, 0.99])
@pytest.mark.parametrize("dim", [None, 3])
def test_whitened_directions_is_the_trace_of_the_in_sample_hat_matrix(n, d, rho, dim):
    x = np.random.default_rng(1).standard_normal((n, d)) * np.geomspace(5, 0.2, d) + 1.5
    centred, values = spectrum(x)
    cov = naive_shrunk_covariance(centred, rho)
    vals, vecs = np.linalg.eigh(cov)
    vecs = vecs[:, np.argsort(vals)[::-1]][:, : dim or d]
    kept_inverse = vecs @ np.diag(1 / np.sort(vals)[::-1][: dim or d]) @ vecs.T  # Σ*⁻¹ on the kept directions
    hat = (1 - rho) * centred @ kept_inverse @ centred.T / n
    assert whitened_directions(values, rho, dim) == pytest.approx(np.trace(hat), rel=1e-8)


def test_without_shrinkage_every_varying_direction_counts_once():
    x = np.random.default_rng(2).standard_normal((9, 25))
    _, values = spectrum(x)
    assert whitened_directions(values, 0.0) == 8  # N − 1: the simplex
    assert whitened_directions(values, 0.0, dim=5) == 5
    assert whitened_directions(values, 1.0) == 0.0


@pytest.mark.parametrize("target", [0.5, 1.2, 3.0, 7.9])
def test_shrinkage_for_directions_is_the_smallest_within_budget(target):
    x = np.random.default_rng(3).standard_normal((9, 25)) * np.geomspace(8, 0.5, 25)
    _, values = spectrum(x)
    rho = shrinkage_for_directions(values, target)
    assert 0 < rho < 1
    assert whitened_directions(values, rho) <= target
    ratio = rho / (1 - rho) * (1 - 1e-6)  # a hair less shrinkage is over budget
    assert whitened_directions(values, ratio / (1 + ratio)) > target
    assert shrinkage_for_directions(values, 8.0) == 0.0  # plain whitening whitens 8 already
    with pytest.raises(ConfigError):
        shrinkage_for_directions(values, 0.0)


@pytest.mark.parametrize("rho", [0.0, 0.4, 0.95])
def test_shrunk_whitening_is_the_inverse_square_root_of_the_shrunk_covariance(rho):
    rng = np.random.default_rng(4)
    rotation = np.linalg.qr(rng.normal(size=(6, 6)))[0]
    x = rng.standard_normal((300, 6)) * np.geomspace(10, 0.3, 6) @ rotation + 2
    centred = x - x.mean(axis=0)
    vals, vecs = np.linalg.eigh(naive_shrunk_covariance(centred, rho))
    naive = l2n(centred @ vecs @ np.diag(vals**-0.5) @ vecs.T)
    fitted = fit_pca_whitening(x.astype(np.float32), shrinkage=rho).apply(x.astype(np.float32))
    # the two differ by a rotation (eigenbasis vs symmetric square root): compare every inner product
    np.testing.assert_allclose(fitted @ fitted.T, naive @ naive.T, atol=2e-5)


def test_the_few_samples_route_matches_the_full_eigendecomposition():
    """fit_chosen_pca_whitening takes eigenvectors from the N × N Gram matrix when N ≤ D."""
    x = np.random.default_rng(5).standard_normal((12, 40)).astype(np.float32) * np.geomspace(3, 0.3, 40) + 1
    for rho in (0.3, 0.999):
        chosen, choice = fit_chosen_pca_whitening(x, dim=11, shrinkage=rho)
        full = fit_pca_whitening(x, dim=11, shrinkage=rho)
        assert choice.dim == chosen.dim == 11
        np.testing.assert_allclose(chosen.projection, full.projection, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(chosen.mean, full.mean, atol=1e-6)


def test_plain_whitening_without_shrinkage_is_unchanged():
    """Recognition fits fit_pca_whitening(references, dim) and must see the same floats as before."""
    x = np.random.default_rng(6).standard_normal((30, 10)).astype(np.float32) * np.geomspace(4, 0.5, 10)
    xd = x.astype(np.float64)
    centred = xd - xd.mean(axis=0)
    vals, vecs = np.linalg.eigh(centred.T @ centred / len(x))
    order = np.argsort(vals)[::-1]
    vals, vecs = vals[order], vecs[:, order]
    vecs = vecs * np.where(vecs[np.argmax(np.abs(vecs), axis=0), np.arange(10)] < 0, -1.0, 1.0)
    expected = (vecs[:, :6].T / np.sqrt(vals[:6])[:, None]).astype(np.float32)
    np.testing.assert_array_equal(fit_pca_whitening(x, dim=6).projection, expected)


# ---- the collapse of the old rule, and the choice ------------------------------------------------------


@pytest.mark.parametrize("n", [10, 33])
def test_the_old_rule_puts_a_small_collection_on_a_regular_simplex(n):
    """With N ≤ D, the N − 1 kept directions are all the centred data spans; whitening gives the N points
    identity covariance there, so their Gram matrix is N·I − 11ᵀ and after L2 normalisation every non-self
    score is −1/(N − 1): search can no longer tell a group mate from anything else."""
    x, groups = clustered(n, d=256, seed=1)
    np.testing.assert_allclose(off_diagonal(old_rule(x).apply(x)), -1 / (n - 1), atol=1e-4)
    assert group_map(old_rule(x).apply(x), groups) < group_map(x, groups)
    whitening, _ = fit_chosen_pca_whitening(x)
    scores, raw = off_diagonal(whitening.apply(x)), off_diagonal(x)
    assert scores.std() > 0.9 * raw.std()  # not equidistant: spread as much as the raw scores
    assert np.corrcoef(scores, raw)[0, 1] > 0.7  # and in much the same order


def test_few_images_are_barely_whitened_and_many_are_whitened_plainly():
    rhos = []
    for n in (13, 33, 200, 1000):
        x, _ = clustered(n, d=256, seed=2, nuisance=1.0)
        _, choice = fit_chosen_pca_whitening(x)
        assert (choice.samples, choice.input_dim, choice.dim) == (n, 256, min(256, n - 1))
        assert choice.directions <= (n - 1) / IMAGES_PER_DIRECTION + 1e-9
        rhos.append(choice.shrinkage)
    assert rhos[0] > 0.99 and rhos == sorted(rhos, reverse=True)
    # N − 1 ≥ IMAGES_PER_DIRECTION·D: no shrinkage, exactly plain PCA-whitening (the large-collection case)
    d = 24
    x, _ = clustered(int(IMAGES_PER_DIRECTION) * d + 200, d=d, seed=3, nuisance=1.0)
    whitening, choice = fit_chosen_pca_whitening(x)
    assert (choice.shrinkage, choice.dim) == (0.0, d)
    assert choice.directions == d and "plain PCA-whitening" in choice.reason
    np.testing.assert_array_equal(whitening.projection, fit_pca_whitening(x).projection)


def test_the_choice_says_what_it_chose_and_why():
    x, _ = clustered(33, seed=4)
    _, choice = fit_chosen_pca_whitening(x)
    summary = choice.summary()
    assert summary.startswith(f"2048 → 32 (shrinkage {choice.shrinkage:.4g}, ")
    assert "chosen for 33 images" in summary and "about 0.32 directions" in summary
    assert "would whiten all 32 and score every image −1/32" in summary
    _, given = fit_chosen_pca_whitening(x, dim=8, shrinkage=0.5)
    assert (given.dim, given.shrinkage) == (8, 0.5) and "as given" in given.reason


def test_what_cannot_be_estimated_is_refused():
    x, _ = clustered(13, d=64, seed=5)
    _, values = spectrum(x)
    with pytest.raises(WhiteningError, match=f"at least {MIN_PCA_SAMPLES} images"):
        choose_pca(values, 2)
    with pytest.raises(ConfigError, match=r"vary in 12 directions.*1\.\.12"):
        fit_chosen_pca_whitening(x, dim=13)
    with pytest.raises(ConfigError, match=r"1\.\.12"):
        fit_chosen_pca_whitening(x, dim=64)
    with pytest.raises(ConfigError, match="regular simplex"):
        fit_chosen_pca_whitening(x, shrinkage=0.0)
    assert fit_chosen_pca_whitening(x, dim=4, shrinkage=0.0)[1].directions == 4  # fewer: allowed
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="shrinkage"):
            fit_chosen_pca_whitening(x, shrinkage=bad)
    with pytest.raises(ConfigError, match="images_per_direction"):
        fit_chosen_pca_whitening(x, images_per_direction=0)
    with pytest.raises(WhiteningError, match="do not vary"):
        fit_chosen_pca_whitening(np.ones((5, 8), np.float32))
    with pytest.raises(WhiteningError):
        fit_chosen_pca_whitening(x[:2])


def test_duplicates_lower_the_number_of_directions():
    x, _ = clustered(12, d=64, seed=6)
    doubled = np.concatenate([x, x[:3]])  # 15 rows, still 11 directions
    whitening, choice = fit_chosen_pca_whitening(doubled)
    assert choice.dim == whitening.dim == 11
    with pytest.raises(ConfigError, match="vary in 11 directions"):
        fit_chosen_pca_whitening(doubled, dim=12)


# ---- whitening never makes a collection's own groups harder to find --------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_whitening_200_clustered_vectors_never_lowers_their_groups_map(seed):
    x, groups = clustered(200, seed=seed)
    whitening, _ = fit_chosen_pca_whitening(x)
    assert group_map(whitening.apply(x), groups) >= group_map(x, groups)


@pytest.mark.parametrize("n", [10, 33])
def test_whitening_a_few_clustered_vectors_does_not_lower_their_groups_map(n):
    """10 or 33 vectors can whiten about 0.9 or 3.2 directions, so their whitening is mostly centring on their
    mean — which every PCA-whitening does, and which alone can swap a pair or two of a 10-vector
    collection either way. Over 20 seeded collections the mAP does not drop on average, and no collection
    loses more than such a swap; the old rule loses most of it every time."""
    raw, whitened, old = [], [], []
    for seed in range(20):
        x, groups = clustered(n, seed=seed)
        raw.append(group_map(x, groups))
        whitened.append(group_map(fit_chosen_pca_whitening(x)[0].apply(x), groups))
        if seed < 3:
            smaller = clustered(n, d=256, seed=seed)  # the old rule on 256-D, to keep the test quick
            old.append(group_map(old_rule(smaller[0]).apply(smaller[0]), smaller[1]) - raw[-1])
    gains = np.array(whitened) - np.array(raw)
    assert gains.mean() >= 0 and gains.min() > -0.025
    assert max(old) < -0.2


def test_whitening_removes_shared_nuisance_directions_once_there_are_enough_images():
    """The point of PCA-whitening: 2,000 images can whiten ~20 directions, enough to flatten 16 directions
    every vector shares, which hide the groups from raw cosine similarity."""
    x, groups = clustered(2000, d=256, seed=7, noise=1.0, nuisance=1.0)
    whitening, _ = fit_chosen_pca_whitening(x)
    assert group_map(whitening.apply(x), groups) > group_map(x, groups) + 0.05


def sample_photos() -> tuple[list[Path], np.ndarray]:
    """The UKBench sample (groups of 4 by number) and the Holidays sample (group = first four digits),
    and 20 Caltech-101 photos of other subjects as distractors: 33 photos, as in the report."""
    ukbench = sorted((SHARED_DATA / "ukbench-sample").glob("*.jpg"))
    holidays = sorted((SHARED_DATA / "holidays-sample").glob("*.jpg"))
    caltech = [
        SHARED_DATA / "caltech101" / c / f"image_{i:04d}.jpg"
        for c in ("accordion", "camera", "lamp", "pizza", "watch")
        for i in range(1, 5)
    ]
    if not (ukbench and holidays and all(p.exists() for p in caltech)):
        pytest.skip("the shared UKBench, Holidays and Caltech-101 samples are not here")
    groups = [int(p.stem[7:]) // 4 for p in ukbench] + [1000 + int(p.stem[:4]) for p in holidays]
    return ukbench + holidays + caltech, np.array(groups + [-1] * len(caltech))


@pytest.fixture(scope="module")
def photo_descriptors(resnet50_extractor) -> tuple[np.ndarray, np.ndarray]:
    paths, groups = sample_photos()
    vectors = [r.vector for r in resnet50_extractor.describe_files(paths)]
    assert all(v is not None for v in vectors)
    return np.stack(vectors).astype(np.float32), groups


@pytest.mark.weights
@pytest.mark.parametrize("n", [13, 33])
def test_whitening_real_photos_on_themselves_never_lowers_their_groups_map(photo_descriptors, n):
    x, groups = photo_descriptors[0][:n], photo_descriptors[1][:n]
    raw = group_map(x, groups)
    old = old_rule(x).apply(x)
    np.testing.assert_allclose(off_diagonal(old), -1 / (n - 1), atol=1e-3)  # the reported collapse
    assert group_map(old, groups) < raw
    whitening, choice = fit_chosen_pca_whitening(x)
    whitened = whitening.apply(x)
    assert group_map(whitened, groups) >= raw
    assert choice.dim == n - 1 and choice.directions <= (n - 1) / IMAGES_PER_DIRECTION + 1e-9
    top = np.argsort(-(whitened[0] @ whitened.T))[1:4]  # ukbench00000's nearest other images
    assert set(top.tolist()) == {1, 2, 3}


@pytest.mark.slow
@pytest.mark.weights
def test_cli_says_what_it_chose_and_refuses_what_cannot_be_estimated(tmp_path):
    from tests.conftest import require_weights

    require_weights("resnet50.keras-imagenet")
    paths, _ = sample_photos()
    photos = tmp_path / "photos"
    photos.mkdir()
    for path in paths[:13]:
        (photos / path.name).write_bytes(path.read_bytes())
    collection = str(tmp_path / "collection")
    settings = ("--imsize", "128", "--precision", "fp32")
    indexed = succeeded(run_cli("index", str(photos), "-c", collection, "--whiten", "pca", *settings))
    assert "pca whitening 2048 → 12 (shrinkage 0.99" in indexed.stdout
    assert "chosen for 13 images" in indexed.stdout
    quiet = succeeded(run_cli("index", str(photos), "-c", collection, "--whiten", "pca", "--json", *settings))
    assert json_lines(quiet.stdout)[0]["collection"]["whitening"] == "pca"  # JSON output stays one line
    too_many = run_cli("whiten", "fit", "-c", collection, "--dim", "13")
    assert too_many.returncode != 0 and "1..12" in too_many.stderr and "Traceback" not in too_many.stderr
    simplex = run_cli("whiten", "fit", "-c", collection, "--shrinkage", "0")
    assert simplex.returncode != 0 and "simplex" in simplex.stderr
    given = succeeded(run_cli("whiten", "fit", "-c", collection, "--dim", "6", "--shrinkage", "0.5"))
    assert "pca whitening 2048 → 6 (shrinkage 0.5," in given.stdout
