"""The distractor protocol: test splits, validation folds drawn from references only, scoring, the fast
α-expanded vote against the library's, the ladder's spaces, and the ladder on small synthetic descriptors
against the library's classifiers."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.evaluate.alpha_voter import AlphaVoter
from lookalike.evaluate.ladder import SHORTLIST, STAGES, run_ladder
from lookalike.evaluate.spaces import AggregatedSpace, Config, MatrixSpace, VerifiedSpace
from lookalike.evaluate.splits import (
    BALANCED,
    TINI,
    RecognitionSplit,
    distractor_splits,
    object_query_count,
    score,
    shared_references,
    validation_folds,
)
from lookalike.labels import LabelledImages
from lookalike.recognize.knn import (
    KnnClassifier,
    Neighbour,
    Prediction,
    alpha_mean_knn_classify,
    exact_search,
)
from lookalike.recognize.multiscale import AggregatedClassifier, MultiScaleKnn

SCALES = (0.25, 0.5, 0.7071067811865476, 1.0, 1.4142135623730951)


def synthetic(classes: int = 12, per_class: int = 24, distractors: int = 30, d: int = 24, seed: int = 0):
    """Clustered multi-scale descriptors (N, 5, d): class centre + image noise + scale noise; distractors
    are spread out. Class sizes vary (per_class .. per_class + classes − 1)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((classes, d))
    labels, rows = [], []
    for c in range(classes):
        for _ in range(per_class + c):
            labels.append(f"class{c:02d}")
            rows.append(centres[c] + 0.9 * rng.standard_normal(d) + 0.5 * rng.standard_normal((5, d)))
    for _ in range(distractors):
        labels.append("BG")
        rows.append(1.2 * rng.standard_normal(d) + 0.4 * rng.standard_normal((5, d)))
    x = np.asarray(rows, dtype=np.float32)
    x /= np.linalg.norm(x, axis=2, keepdims=True)
    paths = tuple(Path(f"/data/{label}/{i}.jpg") for i, label in enumerate(labels))
    return x, LabelledImages(paths, tuple(labels), "BG")


@pytest.fixture(scope="module")
def data():
    return synthetic()


# ---- splits ------------------------------------------------------------------------------------------


def test_distractor_splits(data) -> None:
    _, dataset = data
    labels = np.asarray(dataset.labels, dtype=object)
    splits = distractor_splits(dataset, object_queries=7, seed=4)
    distractors = np.flatnonzero(labels == "BG")
    tini, balanced = splits[TINI], splits[BALANCED]
    for split in (tini, balanced):
        assert np.isin(distractors, split.queries).all()  # every distractor is a query
        assert not np.isin(distractors, split.references).any()
        everything = np.sort(np.concatenate([split.queries, split.references]))
        np.testing.assert_array_equal(everything, np.arange(len(labels)))
    tini_objects = np.setdiff1d(tini.queries, distractors)
    balanced_objects = np.setdiff1d(balanced.queries, distractors)
    assert len(tini_objects) == 7 and len(set(labels[tini_objects])) == 7  # 7 different classes
    assert len(balanced_objects) == len(distractors)  # 50 % distractors
    assert np.isin(tini_objects, balanced_objects).all()  # nested
    counts = np.unique(labels[balanced_objects], return_counts=True)[1]
    assert counts.max() - counts.min() <= 1  # round-robin over the classes
    np.testing.assert_array_equal(shared_references(splits), balanced.references)
    again = distractor_splits(dataset, object_queries=7, seed=4)
    np.testing.assert_array_equal(again[TINI].queries, tini.queries)
    other = distractor_splits(dataset, object_queries=7, seed=5)
    assert not np.array_equal(other[TINI].queries, tini.queries)
    with pytest.raises(ConfigError, match="different classes"):
        distractor_splits(dataset, object_queries=13)


def test_validation_folds_stay_inside_the_pool(data) -> None:
    _, dataset = data
    labels = np.asarray(dataset.labels, dtype=object)
    pool = shared_references(distractor_splits(dataset, object_queries=7))
    folds = validation_folds(labels, pool, 5, 20, folds=3, heldout=3, seed=1)
    wide = validation_folds(labels, pool, 20, 20, folds=3, heldout=3, seed=1)
    assert len({tuple(f.queries) for f in folds}) == 3  # folds differ
    for fold, bigger in zip(folds, wide, strict=True):
        assert np.isin(fold.queries, pool).all() and np.isin(fold.references, pool).all()
        known = set(labels[fold.references])
        pseudo = [q for q in fold.queries if labels[q] not in known]
        objects = [q for q in fold.queries if labels[q] in known]
        assert len(pseudo) == 20 and len(set(labels[pseudo])) == 3  # three held-out classes
        assert len(objects) == 5 and len(set(labels[objects])) == 5
        assert np.isin(fold.queries, bigger.queries).all()  # same seed, more queries: nested
        assert "BG" not in known
    assert all(
        np.array_equal(a.queries, b.queries)
        for a, b in zip(folds, validation_folds(labels, pool, 5, 20, 3, 3, 1), strict=True)
    )
    with pytest.raises(ConfigError):
        RecognitionSplit("bad", np.array([1, 2]), np.array([2, 3]))


def test_score_by_hand() -> None:
    labels = np.array(["a", "a", "b", "BG", "a", "b"], dtype=object)
    split = RecognitionSplit("s", np.array([0, 2, 3]), np.array([1, 4, 5]))
    predictions = [Prediction("a", 0.5), Prediction("a", 0.9), Prediction("b", 0.7)]
    # ranked: 0.9 wrong (b predicted a), 0.7 distractor, 0.5 right at precision 1/3; M = 2 known queries
    result = score(predictions, labels, split)
    assert result.gap == pytest.approx((1 / 3) / 2)
    assert result.accuracy == pytest.approx(0.5)
    no_answer = [Prediction(None, float("-inf")), Prediction("b", 0.9), Prediction("b", 0.1)]
    assert score(no_answer, labels, split).gap == pytest.approx(0.5)


# ---- the fast α vote -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alpha", "k", "transform"), [(0.0, 5, "identity"), (0.9, 7, "sqrt"), (1.3, 3, "log"), (2.0, 9, "square")]
)
def test_alpha_voter_matches_the_library(data, alpha: float, k: int, transform: str) -> None:
    x, dataset = data
    xs = x[:, 3]
    labels = np.asarray(dataset.labels, dtype=object)
    queries, references = np.arange(0, len(xs), 7), np.setdiff1d(np.arange(len(xs)), np.arange(0, len(xs), 7))
    xq, xb = xs[queries], xs[references]
    _, ids = exact_search(xq, xb, k)
    fast = AlphaVoter(xq, xb, labels[references]).classify(ids, alpha, transform)
    slow = alpha_mean_knn_classify(xq, xb, labels[references], ids, alpha, transform)
    for f, s in zip(fast, slow, strict=True):
        assert f.label == s.label
        assert f.confidence == pytest.approx(s.confidence, abs=1e-5)
        assert [n.id for n in f.neighbours] == [n.id for n in s.neighbours]
        assert isinstance(f.neighbours[0], Neighbour)


# ---- the ladder --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ladder(data):
    x, dataset = data
    splits = distractor_splits(dataset, object_queries=7)
    return run_ladder(x, dataset, splits, scales=SCALES, folds=2, heldout=3, train_queries=15)


def test_ladder_selects_one_row_per_stage_by_validation(ladder) -> None:
    stages = [s for s in STAGES if s != "+ verifier"]  # no local features given
    for variant in (TINI, BALANCED):
        summary = ladder.summary(variant)
        assert [r.stage for r in summary] == stages
        for row in summary:
            candidates = [r for r in ladder.rows if r.variant == variant and r.stage == row.stage]
            assert row.validation.gap == max(r.validation.gap for r in candidates)
            assert 0.0 <= row.test.gap <= 1.0 and 0.0 <= row.test.accuracy <= 1.0
        by_stage = {r.stage: r for r in summary}
        base = max(by_stage["aggregation"], by_stage["similarity matrix"], key=lambda r: r.validation.gap)
        verified = by_stage["+ verifier (no local features)"]
        assert isinstance(verified.config.space, VerifiedSpace)
        assert verified.config.space.base == base.config.space
        assert base.config.space.whitened  # whitened from the similarity matrix on
    grid = [r for r in ladder.rows if r.variant == TINI and r.stage == "k-NN"]
    assert len(grid) == 4 * 6
    assert len([r for r in ladder.rows if r.variant == TINI and r.stage == "aggregation: weights"]) == 31
    assert ladder.verifier_pairs > 0
    assert [name for name, _ in ladder.stage_seconds] == stages
    one_nn = ladder.summary(TINI)[0]
    assert one_nn.description == "1-NN — scale 1"


def test_the_ladder_grids_in_order(ladder) -> None:
    """The grids of each stage, in the order that breaks ties between equal validation scores."""
    ks, transforms = (1, 3, 7, 13, 17, 23), ("identity", "square", "sqrt", "log")
    s1 = AggregatedSpace((0, 0, 0, 1, 0))

    def grid(stage: str) -> list[Config]:
        return [r.config for r in ladder.rows if r.variant == BALANCED and r.stage == stage]

    assert grid("1-NN") == [Config(s1, "1nn")]
    assert grid("k-NN") == [Config(s1, "knn", t, k) for t in transforms for k in ks]
    mean = next(r.config for r in ladder.summary(BALANCED) if r.stage == "mean k-NN")
    assert grid("α-expanded") == [
        Config(s1, "alpha", mean.transform, k, a) for a in (0.5, 0.7, 0.9, 1.1) for k in ks
    ]
    reducers = ("max", "sum_row_max", "sum_col_max", "sum_row_max_sq", "sum_col_max_sq", "mean")
    assert grid("similarity matrix") == [
        Config(MatrixSpace(r), "knn", t, k) for r in reducers for t in transforms for k in ks
    ]
    weights = [c.space.weights for c in grid("aggregation: weights")]
    assert weights[:3] == [(1, 0, 0, 0, 0), (0, 1, 0, 0, 0), (1, 1, 0, 0, 0)] and len(set(weights)) == 31


def test_ladder_never_looks_at_the_test_queries(data, ladder) -> None:
    """Scrambling the test queries' descriptors changes test scores, never what validation selects."""
    x, dataset = data
    splits = distractor_splits(dataset, object_queries=7)
    scrambled = x.copy()
    tested = np.union1d(splits[TINI].queries, splits[BALANCED].queries)
    noise = np.random.default_rng(9).standard_normal(scrambled[tested].shape).astype(np.float32)
    scrambled[tested] = noise / np.linalg.norm(noise, axis=2, keepdims=True)
    other = run_ladder(scrambled, dataset, splits, scales=SCALES, folds=2, heldout=3, train_queries=15)
    for variant in (TINI, BALANCED):
        picked = [(r.stage, r.config, r.validation) for r in ladder.summary(variant)]
        assert [(r.stage, r.config, r.validation) for r in other.summary(variant)] == picked
    assert [r.test for r in other.rows] != [r.test for r in ladder.rows]


def test_whitening_is_fitted_on_the_references_of_each_split(data, monkeypatch) -> None:
    """Every PCA-whitening sees exactly one split's references: never its queries, real or pseudo."""
    import lookalike.evaluate.ladder as ladder_module
    import lookalike.recognize.knn as knn
    import lookalike.recognize.multiscale as multiscale

    x, dataset = data
    splits = distractor_splits(dataset, object_queries=7)
    fitted: list[np.ndarray] = []
    fit = knn.fit_pca_whitening

    def recording(rows: np.ndarray, *args, **kwargs):
        fitted.append(rows.copy())
        return fit(rows, *args, **kwargs)

    monkeypatch.setattr(knn, "fit_pca_whitening", recording)
    monkeypatch.setattr(multiscale, "fit_pca_whitening", recording)
    ladder = ladder_module._Ladder(x, dataset, splits, SCALES, None, 2, 3, 15, 0, None)
    everything = [*ladder.train, *(f for fs in ladder.folds.values() for f in fs), *splits.values()]
    scale_one = AggregatedSpace((0, 0, 0, 1, 0), whitened=True)
    for split in everything:
        fitted.clear()
        ladder.release()
        ladder.vectors(scale_one, split)
        ladder.matrix_shortlists(True, split)
        assert len(fitted) == 1 + len(SCALES)
        expected = [x[split.references, 3], *(x[split.references, i] for i in range(len(SCALES)))]
        for rows, want in zip(fitted, expected, strict=True):
            np.testing.assert_allclose(rows, want, atol=1e-6)


def test_space_names() -> None:
    assert AggregatedSpace((0, 0, 0, 1, 0)).describe(SCALES) == "scale 1"
    assert (
        AggregatedSpace((1, 1, 0, 0, 1), whitened=True).describe(SCALES)
        == "scales 0.25+0.5+1.4 summed, PCA-whitened"
    )
    assert (
        MatrixSpace("sum_row_max").describe(SCALES)
        == "5×5 similarity matrix, sum_row_max, whitened per scale"
    )
    verified = VerifiedSpace(AggregatedSpace((0, 0, 0, 1, 0)), "mlp", "product", 23)
    assert verified.describe(SCALES) == "scale 1, top 23 re-scored by the mlp verifier (s·P(same))"
    assert VerifiedSpace(MatrixSpace("max"), "logistic-global", "probability", 23).describe(SCALES) == (
        "5×5 similarity matrix, max, whitened per scale, top 23 re-scored by the logistic-global verifier "
        "(P(same))"
    )
    space = AggregatedSpace((0, 1, 0, 1, 0), whitened=True)
    assert Config(space, "alpha", "sqrt", 7, 0.9).describe(SCALES) == (
        "α-expanded mean k-NN √x, k=7, α=0.9 — scales 0.5+1 summed, PCA-whitened"
    )
    assert Config(space, "1nn").describe(SCALES) == "1-NN — scales 0.5+1 summed, PCA-whitened"
    assert Config(space, "mean", "log", 3).describe(SCALES).startswith("mean k-NN ln(x+e), k=3 — ")
    assert AggregatedSpace((0.0, 1.0)) == AggregatedSpace((0, 1)) and len({space, replace(space)}) == 1
    assert Config(verified).record()["space"] == {
        "kind": "verified",
        "base": {"kind": "aggregated", "weights": [0, 0, 0, 1, 0], "whitened": False},
        "model": "mlp",
        "rule": "product",
        "top": 23,
    }
    with pytest.raises(ConfigError):
        AggregatedSpace((0, 0, 0))
    with pytest.raises(ConfigError):
        Config(space, "median")


# ---- the ladder against the library's classifiers ------------------------------------------------------


def library_classifier(config: Config) -> AggregatedClassifier | MultiScaleKnn:
    """The product's classifier for a configuration of the ladder, built from its public parts only."""
    space = config.space
    k = None if config.rule == "1nn" else config.k
    if isinstance(space, AggregatedSpace):
        knn = KnnClassifier(config.rule, k, config.transform, config.alpha, whiten=space.whitened)
        return AggregatedClassifier(space.weights, knn)
    assert isinstance(space, MatrixSpace) and config.rule == "knn"
    return MultiScaleKnn(space.reducer, config.k, config.transform, SHORTLIST, whiten=space.whitened)


def library_score(x, labels, config: Config, split: RecognitionSplit):
    classifier = library_classifier(config).fit(x[split.references], labels[split.references])
    return score(classifier.predict(x[split.queries]), labels, split)


def test_the_ladder_scores_what_the_library_classifiers_score(data, ladder) -> None:
    """Every row of the stages before the verifier: validation (mean over the folds, drawn here from the
    public split functions) and test scores equal to the library classifiers' own predictions, exactly; and
    each stage selects its best validation GAP, the first among equals."""
    x, dataset = data
    labels = np.asarray(dataset.labels, dtype=object)
    splits = distractor_splits(dataset, object_queries=7)
    pool = shared_references(splits)
    stages = STAGES[:8]
    for variant, split in splits.items():
        objects = object_query_count(labels, split)
        folds = validation_folds(
            labels, pool, objects, len(split.queries) - objects, 2, 3, 1, f"validation {variant}"
        )
        rows = [r for r in ladder.rows if r.variant == variant and r.stage in stages]
        checked = rows if variant == TINI else [r for r in rows if r.selected]
        for row in checked:
            found = [library_score(x, labels, row.config, f) for f in folds]
            assert row.validation.gap == float(np.mean([s.gap for s in found])), row.description
            assert row.validation.accuracy == float(np.mean([s.accuracy for s in found])), row.description
            assert row.test == library_score(x, labels, row.config, split), row.description
            assert row.description == row.config.describe(SCALES)
        for stage in stages:
            grid = [r for r in rows if r.stage == stage]
            best = max(range(len(grid)), key=lambda i: (grid[i].validation.gap, -i))
            assert [r.selected for r in grid] == [i == best for i in range(len(grid))]
