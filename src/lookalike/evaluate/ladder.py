"""The distractor-heavy recognition protocol on a labelled folder with a clutter class (Caltech-101), and
the ladder of methods from 1-NN to the pairwise verifier, every hyper-parameter chosen on validation folds
drawn from the references only.

Test splits (:func:`~lookalike.evaluate.splits.distractor_splits`), mirroring Tini-GLD (86.5 % of its queries are distractors):

* ``"86.5%"`` — queries: every distractor image (Caltech's 466 readable BACKGROUND_Google images) plus
  ``object_queries`` = 73 object images from 73 different classes; 466 / 539 = 86.5 %.
* ``"50%"`` — queries: the same distractors plus as many object images (466), drawn round-robin over the
  classes in a seeded order (4–5 per class); it contains the 73 of ``"86.5%"``.

References: every object image that is not a query of that split. Classes and their images are shuffled
with ``numpy.random.default_rng(seed)``.

Validation folds (:func:`~lookalike.evaluate.splits.validation_folds`) are built the same way inside a *pool* of references: a
seeded set of ``heldout`` reference classes plays the distractors (their images are pseudo-distractor
queries, drawn round-robin, and none of them is a reference), the other classes give the object queries
and the references. The pool is the images that are references in *both* test splits, so one set of
folds serves both variants, and no test query ever enters a fold or the verifier's training. The verifier
is trained on further folds drawn from the pool minus every validation query.

PCA-whitening is fitted on the references of the split at hand: the test references for the test split,
the fold's own references for a validation or training fold. A fold thus sees its queries — object and
pseudo-distractor alike — as the test sees its queries: from outside the data the whitening was fitted on.
(Fitting on the whole pool made held-out classes part of the whitening, so pseudo-distractors looked
unlike real ones, and a verifier tuned on them misjudged the real clutter.)

From stage 6 on every descriptor is whitened, by design rather than by validation: whitening fitted on the
references pushes clutter away from them, which validation cannot see, since its pseudo-distractors are
object classes (on Caltech-101 stage 5 lowers the validation GAP and raises the test GAP, by 0.11–0.26).

The ladder (:func:`run_ladder`), each stage choosing on the validation folds and building on the choices
before it; every configuration is also scored on the test split, for the record only:

1. ``1-NN`` on the scale-1 descriptor;
2. ``k-NN`` — transforms {x, x², √x, ln(x+e)} × k ∈ :data:`KS`;
3. ``mean k-NN`` — the same grid;
4. ``α-expanded`` — α ∈ :data:`ALPHAS` × k, with the transform chosen in 3;
5. ``+ PCA-whitening`` — 1-NN, k-NN, mean and α (α and its transform from 4) on the whitened descriptor;
6. ``similarity matrix`` — the six reducers × transform × k, each scale whitened on its own (k-NN vote
   over a shortlist of :data:`SHORTLIST` by the summed scales);
7. ``aggregation`` — the 2^S − 1 binary scale weights, whitened, with the best rule of 4–5, then the rule,
   transform and k again for the chosen weights;
8. ``+ verifier (no local features)`` and 9. ``+ verifier`` — the pair model of
   :mod:`~lookalike.recognize.verify` (trained by :mod:`~lookalike.evaluate.verifier_training`) re-scores
   the top :data:`VERIFIED` of the better of 6 and 7 (by validation), then a k-NN vote; model (logistic /
   MLP), re-scoring rule, transform and k chosen on validation.

The spaces and configurations are values of :mod:`lookalike.evaluate.spaces`. Every space is made by the
library's classifiers fitted on the split's references — an
:class:`~lookalike.recognize.multiscale.AggregatedClassifier` over a
:class:`~lookalike.recognize.knn.KnnClassifier`, or a :class:`~lookalike.recognize.multiscale.MultiScaleKnn`
— which give a shortlist of :data:`VERIFIED` neighbours per query; the rules of
:mod:`lookalike.recognize.knn` vote over its first ``k``, so one search serves the whole grid of ``k``.
α-expanded votes go through :class:`~lookalike.evaluate.alpha_voter.AlphaVoter`, the library's rule
computed on per-class Gram matrices for speed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Final

import numpy as np

from lookalike.errors import ConfigError
from lookalike.evaluate.alpha_voter import AlphaVoter
from lookalike.evaluate.spaces import AggregatedSpace, Config, MatrixSpace, Space, VerifiedSpace
from lookalike.evaluate.splits import (
    RecognitionSplit,
    Score,
    distractor_splits,
    object_query_count,
    score,
    shared_references,
    validation_folds,
)
from lookalike.evaluate.verifier_training import train_verifiers
from lookalike.labels import LabelledImages
from lookalike.recognize.features import LocalFeatureCache
from lookalike.recognize.knn import (
    TRANSFORMS,
    KnnClassifier,
    Prediction,
    as_unit_rows,
    exact_search,
    knn_classify,
    mean_knn_classify,
    nn_classify,
)
from lookalike.recognize.multiscale import (
    DEFAULT_SCALES,
    REDUCERS,
    AggregatedClassifier,
    MultiScaleKnn,
    binary_weight_vectors,
)
from lookalike.recognize.verify import RULES, PairFeaturizer, PairVerifier, feature_names, rerank

_log = logging.getLogger(__name__)

KS: Final = (1, 3, 7, 13, 17, 23)
ALPHAS: Final = (0.5, 0.7, 0.9, 1.1)
SHORTLIST: Final = 100
VERIFIED: Final = max(KS)
STAGES: Final = (
    "1-NN",
    "k-NN",
    "mean k-NN",
    "α-expanded",
    "+ PCA-whitening",
    "similarity matrix",
    "aggregation: weights",
    "aggregation",
    "+ verifier (no local features)",
    "+ verifier",
)


@dataclass(frozen=True)
class LadderRow:
    """A configuration of a stage with its mean validation score and its test score."""

    variant: str
    stage: str
    description: str
    config: Config
    validation: Score
    test: Score
    selected: bool = False


@dataclass(frozen=True)
class LadderResult:
    """Every configuration evaluated (``rows``), the seconds each stage took, the verifier's training size."""

    rows: tuple[LadderRow, ...]
    stage_seconds: tuple[tuple[str, float], ...]
    verifier_pairs: int

    def summary(self, variant: str) -> list[LadderRow]:
        """The selected configuration of each stage, in ladder order."""
        return [r for r in self.rows if r.variant == variant and r.selected]


def _grid(space: Space, rules: Sequence[str], alpha: Config | None = None) -> list[Config]:
    """``rules`` × transforms × k on one space; the α rule takes α and transform from ``alpha``."""
    configs = [Config(space, "1nn")] if "1nn" in rules else []
    for rule in (r for r in rules if r in ("knn", "mean")):
        configs += [Config(space, rule, t, k) for t in TRANSFORMS for k in KS]
    if "alpha" in rules and alpha is not None:
        configs += [Config(space, "alpha", alpha.transform, k, alpha.alpha) for k in KS]
    return configs


class _Ladder:
    def __init__(
        self,
        x: np.ndarray,
        dataset: LabelledImages,
        splits: dict[str, RecognitionSplit],
        scales: Sequence[float],
        local: LocalFeatureCache | None,
        folds: int,
        heldout: int,
        train_queries: int,
        seed: int,
        progress: Callable[[str, int, int], None] | None,
    ) -> None:
        self.x = as_unit_rows(x, "descriptors", ndim=3)
        self.labels = np.asarray(dataset.labels, dtype=object)
        if len(self.labels) != len(self.x) or len(scales) != self.x.shape[1] or 1.0 not in scales:
            raise ConfigError(
                f"{len(self.labels)} images and {len(scales)} scales (with 1) for {self.x.shape}"
            )
        self.scales, self.splits, self.progress = tuple(scales), splits, progress
        self.stages = len(STAGES) - (0 if local is not None else 1)
        self.pool = shared_references(splits)
        self.folds = {}
        for name, split in splits.items():
            objects = object_query_count(self.labels, split)
            self.folds[name] = validation_folds(
                self.labels, self.pool, objects, len(split.queries) - objects, folds, heldout, seed + 1,
                f"validation {name}",
            )  # fmt: skip
        used = np.unique(np.concatenate([f.queries for fs in self.folds.values() for f in fs]))
        self.train = validation_folds(
            self.labels, np.setdiff1d(self.pool, used), train_queries, train_queries, 2, heldout, seed + 101,
            "verifier training",
        )  # fmt: skip
        self.featurizer = PairFeaturizer(self.x, dataset.paths if local is not None else None, local)
        self.shortlists: dict[tuple[Space, str], tuple[np.ndarray, np.ndarray]] = {}
        self.features: dict[tuple[Space, str], np.ndarray] = {}
        self.rows: list[LadderRow] = []
        self.timings: list[tuple[str, float]] = []
        self.verifier_pairs = 0
        self._space: AggregatedSpace | None = None
        self._vectors: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._alpha: dict[str, AlphaVoter] = {}

    # -- spaces and shortlists ------------------------------------------------------------------------

    def release(self) -> None:
        self._space, self._vectors, self._alpha = None, {}, {}

    def vectors(self, space: AggregatedSpace, split: RecognitionSplit) -> tuple[np.ndarray, np.ndarray]:
        """Queries and references of ``split`` in ``space`` as an aggregated classifier fitted on the split's
        references compares them (the vectors of the last space asked for are kept)."""
        if space != self._space:
            self.release()
            self._space = space
        if split.name not in self._vectors:
            classifier = AggregatedClassifier(space.weights, KnnClassifier(whiten=space.whitened))
            classifier.fit(self.x[split.references], self.labels[split.references])
            self._vectors[split.name] = classifier.prepare(self.x[split.queries]), classifier.references
        return self._vectors[split.name]

    def shortlist(self, space: Space, split: RecognitionSplit) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and reference positions ``(Q, VERIFIED)`` of a space's shortlist, best first."""
        key = (space, split.name)
        if key not in self.shortlists:
            if isinstance(space, MatrixSpace):
                self.matrix_shortlists(space.whitened, split)
            elif isinstance(space, AggregatedSpace):
                self.shortlists[key] = exact_search(*self.vectors(space, split), VERIFIED)
            else:
                raise ConfigError(f"{space} has no shortlist before its verifier is trained")
        return self.shortlists[key]

    def matrix_shortlists(self, whiten: bool, split: RecognitionSplit) -> None:
        """Shortlists of every reducer from one multi-scale classifier fitted on the split's references:
        top :data:`SHORTLIST` by the summed scales, re-ranked by each reduced similarity matrix."""
        classifier = MultiScaleKnn(k=VERIFIED, shortlist=SHORTLIST, whiten=whiten)
        classifier.fit(self.x[split.references], self.labels[split.references])
        for name, found in classifier.neighbours_by_reducer(self.x[split.queries], REDUCERS).items():
            self.shortlists[(MatrixSpace(name, whiten), split.name)] = found

    # -- evaluating ------------------------------------------------------------------------------------

    def predict(self, c: Config, split: RecognitionSplit) -> list[Prediction]:
        sims, ids = self.shortlist(c.space, split)
        labels = self.labels[split.references]
        if c.rule == "1nn":
            return nn_classify(sims[:, :1], labels[ids[:, :1]], c.transform, ids[:, :1])
        if c.rule == "knn":
            return knn_classify(sims[:, : c.k], labels[ids[:, : c.k]], c.transform, ids[:, : c.k])
        if not isinstance(c.space, AggregatedSpace):
            raise ConfigError(f"the {c.rule} rule needs an aggregated space, got {c.space}")
        xq, xb = self.vectors(c.space, split)
        if c.rule == "mean":
            return mean_knn_classify(xq, xb, labels, ids[:, : c.k], c.transform)
        if split.name not in self._alpha:
            self._alpha[split.name] = AlphaVoter(xq, xb, labels)
        assert c.alpha is not None
        return self._alpha[split.name].classify(ids[:, : c.k], c.alpha, c.transform)

    def evaluate(self, stage: str, variant: str, c: Config) -> LadderRow:
        folds = [score(self.predict(c, f), self.labels, f) for f in self.folds[variant]]
        test = score(self.predict(c, self.splits[variant]), self.labels, self.splits[variant])
        validation = Score(
            float(np.mean([s.gap for s in folds])), float(np.mean([s.accuracy for s in folds]))
        )
        return LadderRow(variant, stage, c.describe(self.scales), c, validation, test)

    def stage(self, stage: str, grids: dict[str, list[Config]]) -> dict[str, LadderRow]:
        """Evaluate every variant's grid (space by space), select by mean validation GAP (ties: first)."""
        started = time.perf_counter()
        rows: dict[str, list[LadderRow]] = {v: [] for v in grids}
        for space in dict.fromkeys(c.space for configs in grids.values() for c in configs):
            for variant, configs in grids.items():
                rows[variant] += [self.evaluate(stage, variant, c) for c in configs if c.space == space]
            self.release()
        selected = {}
        for variant, found in rows.items():
            best = max(range(len(found)), key=lambda i: (found[i].validation.gap, -i))
            found[best] = replace(found[best], selected=True)
            self.rows += found
            selected[variant] = found[best]
        seconds = time.perf_counter() - started
        self.timings.append((stage, seconds))
        picks = "; ".join(f"{v}: {r.description} (val {r.validation.gap:.3f})" for v, r in selected.items())
        _log.info("%s: %d configurations in %.0f s — %s", stage, sum(map(len, rows.values())), seconds, picks)
        if self.progress is not None:
            self.progress("ladder", len(self.timings), self.stages)
        return selected

    # -- the verifier ---------------------------------------------------------------------------------

    def pair_features(self, base: Space, split: RecognitionSplit) -> np.ndarray:
        key = (base, split.name)
        if key not in self.features:
            sims, ids = self.shortlist(base, split)
            refs = split.references[ids]
            started = time.perf_counter()
            self.features[key] = self.featurizer(split.queries, refs, sims, self.labels[refs])
            seconds = time.perf_counter() - started
            _log.info("pair features of %s (%d pairs) in %.0f s", split.name, ids.size, seconds)
        return self.features[key]

    def verifiers(self, base: Space) -> dict[str, PairVerifier]:
        """Pair models trained on the verifier-training folds in ``base``'s shortlists."""
        features, targets = [], []
        for split in self.train:
            features.append(self.pair_features(base, split).reshape(-1, len(self.featurizer.names)))
            refs = split.references[self.shortlist(base, split)[1]]
            targets.append((self.labels[split.queries][:, None] == self.labels[refs]).ravel())
        x, y = np.concatenate(features), np.concatenate(targets)
        self.verifier_pairs += len(y)
        _log.info("training verifiers on %d pairs (%.1f%% same class)", len(y), 100 * y.mean())
        return train_verifiers(x, y, self.featurizer.names, len(feature_names(len(self.scales), local=False)))

    def verify(self, bases: dict[str, list[AggregatedSpace | MatrixSpace]]) -> None:
        """The last stages: shortlists of each variant's base spaces re-scored by every verifier."""
        names: list[str] = []
        for base in dict.fromkeys(b for spaces in bases.values() for b in spaces):
            models = self.verifiers(base)
            names = list(models)
            splits = [s for v, b in bases.items() if base in b for s in (*self.folds[v], self.splits[v])]
            for split in splits:
                sims, ids = self.shortlist(base, split)
                features = self.pair_features(base, split)
                for name, model in models.items():
                    p = model.probability(features[..., : len(model.names)])
                    for rule in RULES:
                        space = VerifiedSpace(base, name, rule, VERIFIED)
                        self.shortlists[(space, split.name)] = rerank(sims, ids, p, rule)
        for stage, chosen in (
            ("+ verifier (no local features)", [n for n in names if n.endswith("-global")]),
            ("+ verifier", [n for n in names if not n.endswith("-global")]),
        ):
            if chosen:
                self.stage(
                    stage,
                    {
                        v: [Config(VerifiedSpace(b, m, r, VERIFIED), "knn", t, k) for b in spaces for m in chosen for r in RULES for t in TRANSFORMS for k in KS]
                        for v, spaces in bases.items()
                    },
                )  # fmt: skip

    # -- the whole ladder -----------------------------------------------------------------------------

    def run(self) -> LadderResult:
        variants = list(self.splits)
        one = self.scales.index(1.0)
        s1 = AggregatedSpace(tuple(float(i == one) for i in range(len(self.scales))))
        self.stage("1-NN", {v: [Config(s1, "1nn")] for v in variants})
        self.stage("k-NN", {v: _grid(s1, ["knn"]) for v in variants})
        mean = self.stage("mean k-NN", {v: _grid(s1, ["mean"]) for v in variants})
        alpha = self.stage(
            "α-expanded",
            {
                v: [Config(s1, "alpha", mean[v].config.transform, k, a) for a in ALPHAS for k in KS]
                for v in variants
            },
        )
        rules = ["1nn", "knn", "mean", "alpha"]
        s1w = replace(s1, whitened=True)
        whitened = self.stage("+ PCA-whitening", {v: _grid(s1w, rules, alpha[v].config) for v in variants})
        matrix = {v: [Config(MatrixSpace(r, True), "knn", t, k) for r in REDUCERS for t in TRANSFORMS for k in KS] for v in variants}  # fmt: skip
        matrix_best = self.stage("similarity matrix", matrix)
        weights = [tuple(float(w) for w in row) for row in binary_weight_vectors(len(self.scales))]
        sweep = {}
        for v in variants:
            template = max(whitened[v], alpha[v], key=lambda r: r.validation.gap).config
            sweep[v] = [replace(template, space=AggregatedSpace(w, True)) for w in weights]
        chosen = self.stage("aggregation: weights", sweep)
        final = self.stage(
            "aggregation", {v: _grid(chosen[v].config.space, rules, alpha[v].config) for v in variants}
        )
        # The verifier re-scores the shortlist of the better method so far: aggregation or the matrix.
        bases = {v: max(final[v], matrix_best[v], key=lambda r: r.validation.gap) for v in variants}
        self.verify({v: [_unverified(row.config.space)] for v, row in bases.items()})
        return LadderResult(tuple(self.rows), tuple(self.timings), self.verifier_pairs)


def _unverified(space: Space) -> AggregatedSpace | MatrixSpace:
    if isinstance(space, VerifiedSpace):
        raise ConfigError(f"a verified space cannot be verified again: {space}")
    return space


def run_ladder(
    descriptors: np.ndarray,
    dataset: LabelledImages,
    splits: dict[str, RecognitionSplit] | None = None,
    *,
    scales: Sequence[float] = DEFAULT_SCALES,
    local: LocalFeatureCache | None = None,
    folds: int = 3,
    heldout: int = 20,
    train_queries: int = 300,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
) -> LadderResult:
    """Run the whole ladder on per-image descriptors ``(N, S, D)`` of ``dataset`` (one row per image, at
    ``scales``) over ``splits`` (default :func:`~lookalike.evaluate.splits.distractor_splits`).

    ``local`` (a :class:`~lookalike.recognize.features.LocalFeatureCache`) adds SIFT inliers to the
    verifier's features; without it only the ``+ verifier (no local features)`` stage runs. ``folds``
    validation folds per variant and 2 verifier-training folds of ``train_queries`` object and as many
    pseudo-distractor queries are drawn from the shared references with ``heldout`` held-out classes.
    ``progress`` receives ``("ladder", stages done, stages)`` after each stage; what each stage chose is
    logged (``logging``, INFO).
    """
    splits = distractor_splits(dataset, seed=seed) if splits is None else splits
    ladder = _Ladder(
        descriptors, dataset, splits, scales, local, folds, heldout, train_queries, seed, progress
    )
    return ladder.run()


__all__ = [
    "ALPHAS",
    "KS",
    "SHORTLIST",
    "STAGES",
    "VERIFIED",
    "LadderResult",
    "LadderRow",
    "run_ladder",
]
