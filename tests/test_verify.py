"""The pairwise verifier: local features (SIFT inliers), pair features, the model and its file format."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from lookalike.errors import ConfigError
from lookalike.evaluate.verifier_training import train_verifier, train_verifiers
from lookalike.recognize.features import (
    LocalFeatureCache,
    LocalFeatureSettings,
    describe_local,
    match_features,
    sift_available,
)
from lookalike.recognize.multiscale import REDUCERS, similarity_matrices
from lookalike.recognize.verify import (
    PairFeaturizer,
    PairVerifier,
    feature_names,
    pair_features,
    rerank,
    rescore,
)
from tests.conftest import unit_rows

# ---- local features --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def astronaut() -> Image.Image:
    import skimage.data

    return Image.fromarray(skimage.data.astronaut())


def rotated_crop(image: Image.Image) -> Image.Image:
    return image.rotate(25, resample=Image.Resampling.BICUBIC, expand=True).crop((90, 70, 560, 520))


@pytest.mark.parametrize("kind", ["sift", "orb"])
def test_inliers_high_for_a_rotated_crop_low_for_another_photo(
    astronaut: Image.Image, coffee: Image.Image, kind: str
) -> None:
    if kind == "sift" and not sift_available():
        pytest.skip("this OpenCV has no SIFT")
    settings = LocalFeatureSettings(kind=kind)
    original = describe_local(astronaut, settings)
    same = match_features(original, describe_local(rotated_crop(astronaut), settings))
    other = match_features(original, describe_local(coffee, settings))
    assert len(original) > 300 and original.descriptors.dtype == np.uint8
    assert same.inliers >= 60 and same.inliers <= same.matches
    assert other.inliers <= 15
    assert same.inliers > 5 * max(other.inliers, 1)
    fundamental = match_features(
        original, describe_local(rotated_crop(astronaut), settings), geometry="fundamental"
    )
    assert fundamental.inliers >= 60


def test_matching_is_deterministic_and_checks_its_inputs(astronaut: Image.Image, coffee: Image.Image) -> None:
    a, b = describe_local(astronaut), describe_local(coffee)
    assert match_features(a, b) == match_features(a, b)
    empty = describe_local(np.zeros((40, 40), np.uint8))
    assert len(empty) == 0 and match_features(a, empty) == (0, 0)
    with pytest.raises(ConfigError, match="geometry"):
        match_features(a, b, geometry="affine")
    with pytest.raises(ConfigError, match="cannot match"):
        match_features(a, describe_local(coffee, LocalFeatureSettings(kind="orb")))


def test_large_images_are_described_at_max_side(astronaut: Image.Image) -> None:
    features = describe_local(astronaut, LocalFeatureSettings(max_side=256))
    assert features.points.max() < 256


def test_feature_cache_writes_npz_and_reuses_it(astronaut: Image.Image, tmp_path) -> None:
    photo = tmp_path / "astronaut.png"
    astronaut.save(photo)
    cache = LocalFeatureCache(folder=tmp_path / "cache")
    first = cache.get(photo)
    files = list((tmp_path / "cache").rglob("*.npz"))
    assert len(files) == 1
    with np.load(files[0], allow_pickle=False) as data:
        np.testing.assert_array_equal(data["descriptors"], first.descriptors)
    again = LocalFeatureCache(folder=tmp_path / "cache").get(photo)  # a new process would read the file
    np.testing.assert_array_equal(again.points, first.points)
    rotated_crop(astronaut).save(photo)  # a changed file is described again
    changed = LocalFeatureCache(folder=tmp_path / "cache").get(photo)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 2
    assert changed.points.shape != first.points.shape or not np.array_equal(changed.points, first.points)


# ---- pair features ---------------------------------------------------------------------------------------


def test_pair_features_by_hand() -> None:
    sims = np.array([[0.9, 0.6, 0.5]])
    labels = np.array([["a", "b", "a"]], dtype=object)
    matrices = np.arange(3 * 4, dtype=np.float64).reshape(1, 3, 2, 2) / 12
    matches = np.array([[[10, 5], [3, 0], [0, 0]]])
    f = pair_features(sims, labels, matrices, matches)
    names = feature_names(2)
    assert f.shape == (1, 3, len(names)) and f.dtype == np.float32
    column = {name: f[0, :, i] for i, name in enumerate(names)}
    np.testing.assert_allclose(column["similarity"], [0.9, 0.6, 0.5])
    np.testing.assert_allclose(column["log_rank"], np.log([1, 2, 3]), rtol=1e-6)
    np.testing.assert_allclose(column["top_similarity"], [0.9, 0.9, 0.9])
    np.testing.assert_allclose(column["gap"], [0.0, 0.3, 0.4], atol=1e-6)
    np.testing.assert_allclose(column["agreement"], [2 / 3, 1 / 3, 2 / 3], rtol=1e-6)
    np.testing.assert_allclose(column["m_01"], matrices[0, :, 0, 1], rtol=1e-6)
    np.testing.assert_allclose(column["r_max"], matrices[0].max(axis=(1, 2)), rtol=1e-6)
    np.testing.assert_allclose(column["r_sum_row_max"], matrices[0].max(axis=2).sum(axis=1), rtol=1e-6)
    np.testing.assert_allclose(column["log_inliers"], np.log1p([5, 0, 0]), rtol=1e-6)
    assert len(feature_names(2, local=False)) == len(names) - 2
    assert len(names) == 5 + 4 + len(REDUCERS) + 2


def test_featurizer_uses_the_matrices_and_the_cache(
    astronaut: Image.Image, coffee: Image.Image, tmp_path
) -> None:
    paths = [tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"]
    astronaut.save(paths[0])
    rotated_crop(astronaut).save(paths[1])
    coffee.save(paths[2])
    x = unit_rows(3 * 5, 8).reshape(3, 5, 8)
    featurizer = PairFeaturizer(x, paths, LocalFeatureCache(folder=tmp_path / "cache"))
    ids = np.array([[1, 2]])
    f = featurizer(np.array([0]), ids, np.array([[0.8, 0.2]]), np.array([["x", "y"]], dtype=object))
    names = featurizer.names
    assert f.shape == (1, 2, len(names))
    np.testing.assert_allclose(
        f[0, :, names.index("m_34")], similarity_matrices(x[0], x[[1, 2]])[:, 3, 4], rtol=1e-5
    )
    inliers = f[0, :, names.index("log_inliers")]
    assert inliers[0] > np.log1p(60) and inliers[1] < np.log1p(16)
    without = PairFeaturizer(x)(
        np.array([0]), ids, np.array([[0.8, 0.2]]), np.array([["x", "y"]], dtype=object)
    )
    np.testing.assert_array_equal(without, f[..., :-2])


# ---- the model -------------------------------------------------------------------------------------------


def separable(n: int = 600, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Five features of very different scales; the class is ``2·x0 − x1/100 > 0.5`` with a margin."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 5)) * np.array([1.0, 100.0, 3.0, 0.01, 10.0]) + np.array([0, 0, 5, 1, -3])
    rule = 2 * x[:, 0] - x[:, 1] / 100
    keep = np.abs(rule - 0.5) > 0.2
    return x[keep], rule[keep] > 0.5


@pytest.mark.parametrize("hidden", [0, 16])
def test_verifier_learns_a_separable_rule(hidden: int) -> None:
    x, y = separable()
    model = train_verifier(x, y, hidden=hidden, epochs=400, seed=3)
    assert model.hidden == hidden
    p = model.probability(x)
    assert ((p > 0.5) == y).mean() >= 0.98
    test_x, test_y = separable(400, seed=1)
    assert ((model.probability(test_x) > 0.5) == test_y).mean() >= 0.95
    again = train_verifier(x, y, hidden=hidden, epochs=400, seed=3)
    np.testing.assert_array_equal(again.probability(x), p)  # deterministic
    assert p.shape == y.shape and np.all((p >= 0) & (p <= 1))


def test_verifier_round_trip(tmp_path) -> None:
    x, y = separable()
    model = train_verifier(x, y, names=[f"feature {i}" for i in range(5)], hidden=8, epochs=50)
    path = tmp_path / "verifier.npz"
    model.save(path)
    with np.load(path, allow_pickle=False) as data:
        assert data["names"].dtype.kind == "U"
    loaded = PairVerifier.load(path)
    assert loaded.names == model.names and loaded.hidden == 8
    np.testing.assert_array_equal(loaded.probability(x), model.probability(x))
    np.testing.assert_array_equal(loaded.mean, model.mean)
    logistic = train_verifier(x, y, hidden=0, epochs=50)
    logistic.save(path)
    np.testing.assert_array_equal(PairVerifier.load(path).probability(x), logistic.probability(x))


def test_verifier_checks_its_inputs() -> None:
    x, y = separable()
    with pytest.raises(ConfigError, match="both"):
        train_verifier(x, np.zeros(len(x), bool))
    with pytest.raises(ConfigError, match="names"):
        train_verifier(x, y, names=["a"])
    model = train_verifier(x, y, hidden=0, epochs=5)
    with pytest.raises(ConfigError, match="expected 5 pair features"):
        model.probability(x[:, :4])


def test_rescore_rules() -> None:
    sims, p = np.array([[0.8, -0.2]]), np.array([[0.5, 0.9]])
    np.testing.assert_allclose(rescore(sims, p), [[0.4, 0.0]])
    np.testing.assert_allclose(rescore(sims, p, "probability"), p)
    with pytest.raises(ConfigError):
        rescore(sims, p, "sum")


def test_rerank_sorts_by_the_new_scores() -> None:
    sims = np.array([[0.9, 0.8, 0.7]])
    ids = np.array([[5, 6, 7]])
    scores, order = rerank(sims, ids, np.array([[0.1, 1.0, 0.5]]))
    np.testing.assert_allclose(scores, [[0.8, 0.35, 0.09]])
    np.testing.assert_array_equal(order, [[6, 7, 5]])


def test_train_verifiers_with_and_without_local_columns() -> None:
    x, y = separable()
    names = [f"f{i}" for i in range(5)]
    models = train_verifiers(x, y, names, global_columns=3)
    assert set(models) == {"logistic", "mlp", "logistic-global", "mlp-global"}
    assert models["mlp-global"].names == tuple(names[:3]) and models["mlp"].hidden == 16
    assert set(train_verifiers(x[:, :3], y, names[:3], global_columns=3)) == {"logistic-global", "mlp-global"}
