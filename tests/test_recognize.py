"""Recognition: every kNN rule and multi-scale reducer against slow loops, plus hand-computed cases."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.recognize import (
    DEFAULT_SCALES,
    REDUCERS,
    TRANSFORMS,
    AggregatedClassifier,
    KnnClassifier,
    MultiScaleKnn,
    aggregate,
    alpha_mean_knn_classify,
    binary_weight_vectors,
    exact_search,
    knn_classify,
    mean_knn_classify,
    nn_classify,
    similarity_matrices,
)
from lookalike.recognize.knn import TIE_TOLERANCE
from lookalike.whitening import fit_pca_whitening

# ---- the slow, obvious implementations -------------------------------------------------------------------

NAIVE_TRANSFORMS = {
    "identity": lambda s: s,
    "square": lambda s: max(s, 0.0) ** 2,
    "sqrt": lambda s: math.sqrt(max(s, 0.0)),
    "log": lambda s: math.log(max(s, -1.0) + math.e),
}


def dot(a, b) -> float:
    return sum(float(x) * float(y) for x, y in zip(a, b, strict=True))


def unit(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in v))
    return [x / norm for x in v] if norm > 1e-12 else [0.0 for _ in v]


def naive_neighbours(q, xb, k) -> list[tuple[float, int]]:
    """(similarity, index) of the k nearest references; equal similarities: lower index first."""
    return sorted(((dot(q, r), i) for i, r in enumerate(xb)), key=lambda t: (-t[0], t[1]))[:k]


def naive_pick(scores: dict, neighbours, labels) -> tuple[str, float]:
    best = max(scores.values())
    tied = {c for c, s in scores.items() if s >= best - TIE_TOLERANCE * max(1.0, abs(best))}
    for _, i in neighbours:  # nearest first: the first tied class met wins
        if labels[i] in tied:
            return labels[i], scores[labels[i]]
    raise AssertionError("unreachable")


def naive_vote(neighbours, labels, f) -> tuple[str, float]:
    scores: dict[str, float] = {}
    for s, i in neighbours:
        scores[labels[i]] = scores.get(labels[i], 0.0) + f(s)
    return naive_pick(scores, neighbours, labels)


def naive_classify(xq, xb, labels, method, k, f, alpha=None) -> list[tuple[str, float]]:
    out = []
    for q in xq:
        nn = naive_neighbours(q, xb, k)
        if method == "1nn":
            out.append((labels[nn[0][1]], f(nn[0][0])))
            continue
        if method == "knn":
            out.append(naive_vote(nn, labels, f))
            continue
        scores = {}
        for c in dict.fromkeys(labels[i] for _, i in nn):
            neighbours_c = [i for _, i in nn if labels[i] == c]
            members = set(neighbours_c)
            if method == "alpha":
                for j in range(len(xb)):
                    close = any(math.sqrt(max(2 - 2 * dot(xb[j], xb[i]), 0.0)) <= alpha for i in neighbours_c)
                    if labels[j] == c and close:
                        members.add(j)
            total = [sum(float(xb[i][d]) for i in members) for d in range(len(q))]
            scores[c] = f(dot(q, unit(total)))
        out.append(naive_pick(scores, nn, labels))
    return out


def naive_reduce(m: list[list[float]], name: str) -> float:
    s = len(m)
    rows = [max(m[a]) for a in range(s)]
    cols = [max(m[a][b] for a in range(s)) for b in range(s)]
    return {
        "max": max(max(r) for r in m),
        "sum_row_max": sum(rows),
        "sum_col_max": sum(cols),
        "sum_row_max_sq": sum(max(r, 0.0) ** 2 for r in rows),
        "sum_col_max_sq": sum(max(c, 0.0) ** 2 for c in cols),
        "mean": sum(sum(r) for r in m) / (s * s),
    }[name]


def naive_multiscale(xq, xb, labels, reducer, k, f, shortlist, scale) -> list[tuple[str, float]]:
    def global_vector(x):
        if scale is not None:
            return [float(v) for v in x[scale]]
        return unit([sum(float(x[s][d]) for s in range(len(x))) for d in range(len(x[0]))])

    out = []
    for q in xq:
        short = naive_neighbours(global_vector(q), [global_vector(r) for r in xb], shortlist)
        candidates = []
        for rank, (_, i) in enumerate(short):
            m = [[dot(q[a], xb[i][b]) for b in range(len(q))] for a in range(len(q))]
            candidates.append((naive_reduce(m, reducer), rank, i))
        best = sorted(candidates, key=lambda t: (-t[0], t[1]))[:k]
        out.append(naive_vote([(s, i) for s, _, i in best], labels, f))
    return out


# ---- data ------------------------------------------------------------------------------------------------


def l2n(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def clustered(n: int, d: int, classes: int, rng: np.random.Generator, noise: float = 0.6, centres=None):
    """Unit vectors scattered around class centres, and their labels."""
    centres = l2n(rng.standard_normal((classes, d))) if centres is None else centres
    y = rng.integers(classes, size=n)
    x = l2n(centres[y] + noise * rng.standard_normal((n, d)) / math.sqrt(d))
    return x, [f"c{c}" for c in y], centres


def quantised(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors with entries ±0.5 in 4-D: exact dot products, so many exact ties."""
    return (0.5 * rng.choice([-1.0, 1.0], size=(n, 4))).astype(np.float32)


def axes(n: int, rng: np.random.Generator) -> np.ndarray:
    """Unit vectors ±e_i in 3-D: similarities are 1, 0 or -1, so neighbours and class scores tie often."""
    x = np.zeros((n, 3), dtype=np.float32)
    x[np.arange(n), rng.integers(3, size=n)] = rng.choice([-1.0, 1.0], size=n)
    return x


def check_against(predictions, expected) -> None:
    assert len(predictions) == len(expected)
    for p, (label, confidence) in zip(predictions, expected, strict=True):
        assert p.label == label
        assert p.confidence == pytest.approx(confidence, rel=1e-5, abs=1e-5)


METHODS_ALPHA = [("knn", None), ("1nn", None), ("mean", None), ("alpha", 0.6), ("alpha", 1.1)]


# ---- transforms and voting by hand -----------------------------------------------------------------------


def test_transforms_by_hand():
    x = np.array([-2.0, -0.25, 0.0, 0.25, 1.0])
    np.testing.assert_allclose(TRANSFORMS["identity"](x), x)
    np.testing.assert_allclose(TRANSFORMS["square"](x), [0, 0, 0, 0.0625, 1])
    np.testing.assert_allclose(TRANSFORMS["sqrt"](x), [0, 0, 0, 0.5, 1])
    np.testing.assert_allclose(
        TRANSFORMS["log"](x),
        [math.log(math.e - 1), math.log(math.e - 0.25), 1, math.log(math.e + 0.25), math.log(1 + math.e)],
    )


@pytest.mark.parametrize(
    ("transform", "label", "confidence"),
    [
        ("identity", "b", 1.0),  # a: 0.9, b: 0.5 + 0.5
        ("square", "a", 0.81),  # a: 0.81, b: 0.25 + 0.25
        ("sqrt", "b", 2 * math.sqrt(0.5)),  # a: 0.949, b: 1.414
        ("log", "b", 2 * math.log(0.5 + math.e)),  # a: 1.286, b: 2.338
    ],
)
def test_knn_vote_by_hand(transform, label, confidence):
    (p,) = knn_classify([[0.5, 0.9, 0.5]], [["b", "a", "b"]], transform, ids=[[7, 3, 9]])
    assert (p.label, p.confidence) == (label, pytest.approx(confidence))
    assert [n.id for n in p.neighbours] == [3, 7, 9]  # ranked; equal similarities keep input order
    assert [n.label for n in p.neighbours] == ["a", "b", "b"]


def test_knn_tie_goes_to_class_of_nearest_neighbour():
    # a: 0.9 + 0.6, b: 0.8 + 0.7 — equal up to rounding; a holds the nearest neighbour
    (p,) = knn_classify([[0.8, 0.9, 0.7, 0.6]], [["b", "a", "b", "a"]])
    assert p.label == "a" and p.confidence == pytest.approx(1.5)
    (p,) = knn_classify([[0.9, 0.9, 0.1]], [["b", "a", "a"]])  # equal nearest: earlier position wins
    assert p.label == "a"  # a = 1.0 > b = 0.9, no tie
    (p,) = knn_classify([[0.5, 0.5]], [["b", "a"]])
    assert p.label == "b"


def test_missing_neighbours_and_empty_rows():
    preds = knn_classify([[0.9, 0.8], [0.3, 0.2]], [["a", None], [None, None]])
    assert preds[0].label == "a" and len(preds[0].neighbours) == 1
    assert preds[1].label is None and preds[1].confidence == float("-inf") and preds[1].neighbours == ()
    (p,) = knn_classify([[0.9, 0.8]], [["a", "b"]], ids=[[-1, 4]])
    assert p.label == "b" and p.neighbours[0].id == 4


def test_nn_by_hand():
    (p,) = nn_classify([[0.64, 0.81, 0.7]], [["a", "b", "a"]], "sqrt", ids=[[0, 1, 2]])
    assert (p.label, p.confidence) == ("b", pytest.approx(0.9))
    assert p.neighbours == ((1, "b", pytest.approx(0.81)),)


def angles(*degrees: float) -> np.ndarray:
    r = np.radians(degrees)
    return np.stack([np.cos(r), np.sin(r)], axis=1).astype(np.float32)


def test_mean_knn_by_hand():
    q = angles(0)
    xb = angles(20, -20, 5, 90)
    labels = ["a", "a", "b", "c"]
    ids = np.array([[2, 0, 1]])
    (p,) = nn_classify([[0.996, 0.94, 0.94]], [["b", "a", "a"]])
    assert p.label == "b"  # the nearest neighbour is b at 5°
    (p,) = mean_knn_classify(q, xb, labels, ids)
    assert (p.label, p.confidence) == ("a", pytest.approx(1.0, abs=1e-6))  # mean of ±20° is 0°
    (p,) = mean_knn_classify(q, xb, labels, ids, "square")
    assert p.confidence == pytest.approx(1.0, abs=1e-6)
    (p,) = mean_knn_classify(q, xb, labels, np.array([[2, 3]]))
    assert (p.label, p.confidence) == ("b", pytest.approx(math.cos(math.radians(5))))
    # tie: both class means are e1; b holds the nearest neighbour (equal similarity, lower index)
    e = np.eye(2, dtype=np.float32)
    (p,) = mean_knn_classify(e[:1], e[[0, 0, 1]], ["b", "a", "a"], np.array([[0, 1]]))
    assert (p.label, p.confidence) == ("b", pytest.approx(1.0))
    (p,) = mean_knn_classify(e[:1], e[[0, 0, 1]], ["b", "a", "a"], np.array([[1, 0]]))
    assert p.label == "a"  # ranked by similarity, then position: id 1 (a) is first here


def test_alpha_expansion_by_hand():
    # query at 0°; k = 2 neighbours: r0 (a, 10°) and r1 (b, 15°). Distance between unit vectors θ apart
    # is 2 sin(θ/2): α = 1 reaches 60°, α = 2 sin 36° ≈ 1.176 reaches 72°.
    q = angles(0)
    xb = angles(10, 15, 60, -40, 80, 170)
    labels = ["a", "b", "a", "b", "a", "b"]
    ids = np.array([[0, 1]])
    (p,) = mean_knn_classify(q, xb, labels, ids)
    assert (p.label, p.confidence) == ("a", pytest.approx(math.cos(math.radians(10))))
    (p,) = alpha_mean_knn_classify(q, xb, labels, ids, alpha=0.0)
    assert (p.label, p.confidence) == ("a", pytest.approx(math.cos(math.radians(10))))
    # α = 1: a = mean(10°, 60°) → 35°; b = mean(15°, -40°) → -12.5° wins
    (p,) = alpha_mean_knn_classify(q, xb, labels, ids, alpha=1.0)
    assert (p.label, p.confidence) == ("b", pytest.approx(math.cos(math.radians(12.5))))
    # α = 1.2: a also takes 80° (70° from 10°); b still not 170°
    a = xb[[0, 2, 4]].astype(np.float64).sum(axis=0)
    (p,) = alpha_mean_knn_classify(q, xb, labels, ids, alpha=1.2, transform="sqrt")
    assert (p.label, p.confidence) == ("b", pytest.approx(math.sqrt(math.cos(math.radians(12.5)))))
    assert a[0] / np.linalg.norm(a) < math.cos(math.radians(12.5))
    # α = 2 takes every reference of the class
    b = xb[[1, 3, 5]].astype(np.float64).sum(axis=0)
    (p,) = alpha_mean_knn_classify(q, xb, labels, ids, alpha=2.0)
    # b = mean(15°, -40°, 170°) ≈ -15.7° (cos 0.9626); a = mean(10°, 60°, 80°) (cos 0.6337)
    assert (p.label, p.confidence) == ("b", pytest.approx(b[0] / np.linalg.norm(b)))
    assert p.confidence == pytest.approx(0.9626, abs=1e-4)
    assert a[0] / np.linalg.norm(a) == pytest.approx(0.6337, abs=1e-4)


# ---- classifiers against the loops -----------------------------------------------------------------------


@pytest.mark.parametrize(("method", "alpha"), METHODS_ALPHA)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_classifier_matches_loops_on_clusters(method, alpha, transform):
    rng = np.random.default_rng(0)
    xb, labels, centres = clustered(120, 24, 6, rng)
    xq, _, _ = clustered(25, 24, 6, rng, centres=centres)
    k = None if method == "1nn" else 7
    cls = KnnClassifier(method, k=k, transform=transform, alpha=alpha).fit(xb, labels)
    expected = naive_classify(xq, xb, labels, method, k or 1, NAIVE_TRANSFORMS[transform], alpha)
    check_against(cls.predict(xq), expected)


@pytest.mark.parametrize(("method", "alpha"), METHODS_ALPHA)
@pytest.mark.parametrize("transform", list(TRANSFORMS))
@pytest.mark.parametrize("k", [1, 4, 9, 60])
@pytest.mark.parametrize("vectors", [quantised, axes])
def test_classifier_matches_loops_with_ties(method, alpha, transform, k, vectors):
    rng = np.random.default_rng(k)
    xb, xq = vectors(40, rng), vectors(20, rng)  # only 16 or 6 distinct vectors: ties everywhere
    labels = [f"c{c}" for c in rng.integers(2 if vectors is axes else 3, size=40)]
    k = 1 if method == "1nn" else k
    cls = KnnClassifier(method, k=k, transform=transform, alpha=alpha).fit(xb, labels)
    predictions = cls.predict(xq)
    check_against(predictions, naive_classify(xq, xb, labels, method, k, NAIVE_TRANSFORMS[transform], alpha))
    nearest = [naive_neighbours(q, xb, k) for q in xq]
    assert [[n.id for n in p.neighbours] for p in predictions] == [
        [i for _, i in nn][: len(p.neighbours)] for p, nn in zip(predictions, nearest, strict=True)
    ]


def test_k_larger_than_references():
    rng = np.random.default_rng(1)
    xb, labels, centres = clustered(6, 8, 3, rng)
    xq, _, _ = clustered(5, 8, 3, rng, centres=centres)
    for method, alpha in METHODS_ALPHA[2:]:
        cls = KnnClassifier(method, k=50, alpha=alpha).fit(xb, labels)
        predictions = cls.predict(xq)
        assert all(len(p.neighbours) == 6 for p in predictions)
        check_against(
            predictions, naive_classify(xq, xb, labels, method, 50, NAIVE_TRANSFORMS["identity"], alpha)
        )
    sims, ids = KnnClassifier(k=50).fit(xb, labels).search(xq)
    assert sims.shape == ids.shape == (5, 6)


def test_exact_search_backends_agree():
    rng = np.random.default_rng(2)
    xb, _, _ = clustered(300, 32, 10, rng)
    xq, _, _ = clustered(40, 32, 10, rng)
    d_np, i_np = exact_search(xq, xb, 10)
    d_fa, i_fa = exact_search(xq, xb, 10, backend="faiss")
    np.testing.assert_array_equal(i_np, i_fa)
    np.testing.assert_allclose(d_np, d_fa, atol=1e-5)
    np.testing.assert_allclose(d_np, np.sort(xq @ xb.T, axis=1)[:, ::-1][:, :10], atol=1e-6)
    cls = KnnClassifier("mean", k=10, backend="faiss").fit(xb, [str(i % 10) for i in range(300)])
    ref = KnnClassifier("mean", k=10).fit(xb, [str(i % 10) for i in range(300)])
    assert [p.label for p in cls.predict(xq)] == [p.label for p in ref.predict(xq)]


def test_exact_search_block_boundaries(monkeypatch):
    import lookalike.recognize.knn as knn

    rng = np.random.default_rng(3)
    xb, xq = quantised(30, rng), quantised(11, rng)
    expected = exact_search(xq, xb, 5)
    monkeypatch.setattr(knn, "_SEARCH_BLOCK", 60)  # two queries per block
    got = exact_search(xq, xb, 5)
    np.testing.assert_array_equal(expected[1], got[1])
    assert [[i for _, i in naive_neighbours(q, xb, 5)] for q in xq] == got[1].tolist()


def test_whitening_is_fitted_on_references_only():
    rng = np.random.default_rng(4)
    xb, labels, centres = clustered(150, 16, 5, rng)
    xq, _, _ = clustered(30, 16, 5, rng, centres=centres)
    for method, alpha in METHODS_ALPHA:
        cls = KnnClassifier(method, k=None if method == "1nn" else 5, alpha=alpha, whiten=True, whiten_dim=12)
        cls.fit(xb, labels)
        fitted = fit_pca_whitening(xb, 12)
        np.testing.assert_allclose(cls.whitening.projection, fitted.projection, rtol=1e-5, atol=1e-6)
        wb, wq = fitted.apply(xb), fitted.apply(xq)
        expected = naive_classify(
            wq, wb, labels, method, 1 if method == "1nn" else 5, NAIVE_TRANSFORMS["identity"], alpha
        )
        check_against(cls.predict(xq), expected)
        np.testing.assert_allclose(cls.whitening.projection, fitted.projection, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("method", "alpha"), METHODS_ALPHA)
def test_distractors_are_less_confident(method, alpha):
    rng = np.random.default_rng(5)
    xb, labels, centres = clustered(200, 64, 10, rng, noise=0.5)
    xq, truth, _ = clustered(50, 64, 10, rng, noise=0.5, centres=centres)
    distractors = l2n(rng.standard_normal((50, 64)))
    cls = KnnClassifier(method, k=None if method == "1nn" else 5, alpha=alpha).fit(xb, labels)
    true, false = cls.predict(xq), cls.predict(distractors)
    assert np.mean([p.label == t for p, t in zip(true, truth, strict=True)]) > 0.95
    assert np.mean([p.confidence for p in true]) > np.mean([p.confidence for p in false]) + 0.3


def test_bad_inputs():
    rng = np.random.default_rng(6)
    xb, labels, _ = clustered(10, 4, 2, rng)
    with pytest.raises(ConfigError, match="unknown kNN method"):
        KnnClassifier("svm")
    with pytest.raises(ConfigError, match="alpha"):
        KnnClassifier("alpha")
    with pytest.raises(ConfigError, match="alpha"):
        KnnClassifier("mean", alpha=0.5)
    with pytest.raises(ConfigError, match="k = 1"):
        KnnClassifier("1nn", k=3)
    with pytest.raises(ConfigError, match="transform"):
        KnnClassifier(transform="cube")
    with pytest.raises(ConfigError, match="not fitted"):
        KnnClassifier().predict(xb)
    with pytest.raises(ConfigError, match="L2-normalised"):
        KnnClassifier().fit(xb * 2, labels)
    with pytest.raises(ConfigError, match="labels"):
        KnnClassifier().fit(xb, labels[:-1])
    with pytest.raises(ConfigError, match="strings"):
        KnnClassifier().fit(xb, list(range(10)))
    with pytest.raises(ConfigError, match="dimension"):
        KnnClassifier().fit(xb, labels).predict(l2n(np.ones((2, 5))))


# ---- multi-scale -----------------------------------------------------------------------------------------


def test_default_scales():
    assert pytest.approx((0.25, 0.5, 2**-0.5, 1.0, 2**0.5)) == DEFAULT_SCALES
    assert len(REDUCERS) == 6


def test_similarity_matrices_and_reducers_match_loops():
    rng = np.random.default_rng(7)
    q = l2n(rng.standard_normal((5, 8)))
    refs = l2n(rng.standard_normal((9, 5, 8)))
    mats = similarity_matrices(q, refs)
    assert mats.shape == (9, 5, 5)
    loops = [[[dot(q[a], refs[m, b]) for b in range(5)] for a in range(5)] for m in range(9)]
    np.testing.assert_allclose(mats, loops, atol=1e-6)
    for name, reducer in REDUCERS.items():
        np.testing.assert_allclose(reducer(mats), [naive_reduce(m, name) for m in loops], atol=1e-6)


def test_reducers_by_hand():
    m = np.array([[[0.1, 0.5], [-0.2, -0.3]]])  # rows: query scales, columns: reference scales
    expected = {
        "max": 0.5,
        "sum_row_max": 0.5 - 0.2,
        "sum_col_max": 0.1 + 0.5,
        "sum_row_max_sq": 0.25 + 0.0,  # the negative row maximum counts 0
        "sum_col_max_sq": 0.01 + 0.25,
        "mean": 0.1 / 4,
    }
    for name, value in expected.items():
        assert REDUCERS[name](m) == pytest.approx([value]), name


def test_aggregate_and_weight_vectors():
    rng = np.random.default_rng(8)
    x = l2n(rng.standard_normal((4, 3, 6)))
    w = [1, 0, 1]
    loops = [unit([float(x[n, 0, d]) + float(x[n, 2, d]) for d in range(6)]) for n in range(4)]
    np.testing.assert_allclose(aggregate(x, w), loops, atol=1e-6)
    np.testing.assert_allclose(aggregate(x, [0, 1, 0]), x[:, 1], atol=1e-6)
    expected = [[1, 0, 0], [0, 1, 0], [1, 1, 0], [0, 0, 1], [1, 0, 1], [0, 1, 1], [1, 1, 1]]
    assert binary_weight_vectors(3).tolist() == expected
    five = binary_weight_vectors(5)
    assert five.shape == (31, 5) and len({tuple(r) for r in five}) == 31 and five.sum(axis=1).min() == 1
    with pytest.raises(ConfigError):
        aggregate(x, [0, 0, 0])
    with pytest.raises(ConfigError):
        aggregate(x, [1, 1])


def multiscale_data(rng, n, classes=5, s=3, d=12, centres=None):
    """Each image: a class centre plus per-image and per-scale noise, at ``s`` scales."""
    centres = l2n(rng.standard_normal((classes, d))) if centres is None else centres
    y = rng.integers(classes, size=n)
    image = centres[y] + 0.5 * rng.standard_normal((n, d)) / math.sqrt(d)
    x = l2n(image[:, None, :] + 0.4 * rng.standard_normal((n, s, d)) / math.sqrt(d))
    return x, [f"c{c}" for c in y], centres


@pytest.mark.parametrize("reducer", list(REDUCERS))
@pytest.mark.parametrize(("shortlist", "scale"), [(200, None), (12, None), (12, 1)])
def test_multiscale_knn_matches_loops(reducer, shortlist, scale):
    rng = np.random.default_rng(9)
    xb, labels, centres = multiscale_data(rng, 50)
    xq, _, _ = multiscale_data(rng, 8, centres=centres)
    for transform, k in [("identity", 5), ("sqrt", 1), ("log", 12)]:
        cls = MultiScaleKnn(reducer, k=k, transform=transform, shortlist=shortlist, shortlist_scale=scale)
        expected = naive_multiscale(xq, xb, labels, reducer, k, NAIVE_TRANSFORMS[transform], shortlist, scale)
        check_against(cls.fit(xb, labels).predict(xq), expected)


def test_neighbours_by_reducer_is_each_reducers_own_search():
    rng = np.random.default_rng(14)
    xb, labels, centres = multiscale_data(rng, 60)
    xq, _, _ = multiscale_data(rng, 9, centres=centres)
    found = MultiScaleKnn(k=7, shortlist=25, whiten=True).fit(xb, labels).neighbours_by_reducer(xq, REDUCERS)
    assert list(found) == list(REDUCERS)
    for name in REDUCERS:
        own = MultiScaleKnn(name, k=7, shortlist=25, whiten=True).fit(xb, labels).reduced_neighbours(xq)
        np.testing.assert_array_equal(found[name][0], own[0])
        np.testing.assert_array_equal(found[name][1], own[1])
    custom = {"first": lambda m: m[:, 0, 0]}
    sims, ids = MultiScaleKnn(k=3, shortlist=60).fit(xb, labels).neighbours_by_reducer(xq, custom)["first"]
    np.testing.assert_allclose(sims[:, 0], np.einsum("qd,qd->q", xq[:, 0], xb[ids[:, 0], 0]), atol=1e-6)


def test_multiscale_knn_small_reference_set_and_faiss():
    rng = np.random.default_rng(10)
    xb, labels, centres = multiscale_data(rng, 4)
    xq, _, _ = multiscale_data(rng, 3, centres=centres)
    predictions = MultiScaleKnn(k=10, shortlist=20).fit(xb, labels).predict(xq)
    assert all(len(p.neighbours) == 4 for p in predictions)
    check_against(
        predictions,
        naive_multiscale(xq, xb, labels, "sum_row_max", 10, NAIVE_TRANSFORMS["identity"], 20, None),
    )
    faiss_predictions = MultiScaleKnn(k=10, shortlist=20, backend="faiss").fit(xb, labels).predict(xq)
    assert [p.label for p in faiss_predictions] == [p.label for p in predictions]


def test_multiscale_whitening_per_scale_on_references():
    rng = np.random.default_rng(11)
    xb, labels, centres = multiscale_data(rng, 80)
    xq, _, _ = multiscale_data(rng, 10, centres=centres)
    cls = MultiScaleKnn("sum_col_max_sq", k=3, shortlist=30, whiten=True, whiten_dim=8).fit(xb, labels)
    fitted = [fit_pca_whitening(xb[:, s], 8) for s in range(3)]
    for w, f in zip(cls.whitening.whitenings, fitted, strict=True):
        np.testing.assert_allclose(w.projection, f.projection, rtol=1e-5, atol=1e-6)
    wb = np.stack([f.apply(xb[:, s]) for s, f in enumerate(fitted)], axis=1)
    wq = np.stack([f.apply(xq[:, s]) for s, f in enumerate(fitted)], axis=1)
    expected = naive_multiscale(wq, wb, labels, "sum_col_max_sq", 3, NAIVE_TRANSFORMS["identity"], 30, None)
    check_against(cls.predict(xq), expected)


def test_aggregated_classifier_whitens_the_aggregate():
    rng = np.random.default_rng(12)
    xb, labels, centres = multiscale_data(rng, 60)
    xq, truth, _ = multiscale_data(rng, 10, centres=centres)
    w = [1, 0, 1]
    cls = AggregatedClassifier(w).fit(xb, labels)
    fitted = fit_pca_whitening(aggregate(xb, w))
    np.testing.assert_allclose(cls.classifier.whitening.projection, fitted.projection, rtol=1e-5, atol=1e-6)
    expected = naive_classify(
        fitted.apply(aggregate(xq, w)),
        fitted.apply(aggregate(xb, w)),
        labels,
        "knn",
        5,
        NAIVE_TRANSFORMS["identity"],
    )
    check_against(cls.predict(xq), expected)
    np.testing.assert_array_equal(cls.references, fitted.apply(aggregate(xb, w)))
    np.testing.assert_array_equal(cls.prepare(xq), fitted.apply(aggregate(xq, w)))
    assert cls.references is cls.classifier.references
    mean = AggregatedClassifier(w, KnnClassifier("mean", k=3)).fit(xb, labels)
    assert np.mean([p.label == t for p, t in zip(mean.predict(xq), truth, strict=True)]) >= 0.8


def test_multiscale_bad_inputs():
    with pytest.raises(ConfigError, match="reducer"):
        MultiScaleKnn("median")
    with pytest.raises(ConfigError, match="shortlist"):
        MultiScaleKnn(k=10, shortlist=5)
    rng = np.random.default_rng(13)
    xb, labels, _ = multiscale_data(rng, 5)
    with pytest.raises(ConfigError, match="shortlist_scale"):
        MultiScaleKnn(shortlist_scale=3).fit(xb, labels)
    with pytest.raises(ConfigError, match="S, D"):
        MultiScaleKnn().fit(xb, labels).predict(xb[:, :2])
    with pytest.raises(ConfigError):
        similarity_matrices(xb[0], xb[:, :2])
