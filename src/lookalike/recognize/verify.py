"""Pairwise verification: does a shortlisted reference show the query's class? A small binary model
over (query, neighbour) pair features re-scores the shortlist before the k-NN vote.

Pair features (:func:`pair_features`, names from :func:`feature_names`), for the neighbour at rank ``j``
(0-based) of a query's shortlist of ``V``:

* ``similarity`` — the global similarity ``s_j`` the shortlist was ranked by; ``log_rank`` = ``ln(1 + j)``;
* ``top_similarity`` ``s_0`` and ``gap`` ``s_0 − s_j`` — how the query's best match looks (a distractor's
  best match tends to be weak);
* ``agreement`` — the fraction of the ``V`` shortlisted references that share the neighbour's label
  (distractors get mixed shortlists);
* ``m_<i><j>`` — the ``S × S`` multi-scale similarity matrix ``q_i · r_j`` (query scale ``i``, reference
  scale ``j``), flattened, followed by its six reductions (:data:`~lookalike.recognize.multiscale.REDUCERS`);
* ``log_matches`` and ``log_inliers`` — ``ln(1 + n)`` of the local-feature matches that pass the ratio
  test and of the RANSAC inliers among them (:mod:`~lookalike.recognize.features`).

The model (:class:`PairVerifier`) standardises the features (mean and scale stored with it) and is a
logistic regression or a one-hidden-layer ReLU MLP, trained on labelled pairs by the recognition ladder.
It is saved as a plain ``.npz`` and loaded with ``allow_pickle=False``.

:func:`rescore` turns the shortlist similarities into the scores the k-NN vote sums: ``s · P(same)``
(``"product"``) or ``P(same)`` alone (``"probability"``). A distractor query, whose neighbours all get a
low ``P(same)``, ends with a low confidence.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from lookalike.atomic import save_npz_atomic
from lookalike.errors import ConfigError
from lookalike.recognize.features import LocalFeatureCache, MatchResult, match_features
from lookalike.recognize.multiscale import REDUCERS, similarity_matrices

RULES: Final = ("product", "probability")
_FORMAT_VERSION: Final = 1
_CONTEXT: Final = ("similarity", "log_rank", "top_similarity", "gap", "agreement")
_LOCAL: Final = ("log_matches", "log_inliers")


def feature_names(n_scales: int, local: bool = True) -> tuple[str, ...]:
    """Names of the pair features for ``n_scales`` scales, with or without the local-feature pair."""
    matrix = tuple(f"m_{i}{j}" for i in range(n_scales) for j in range(n_scales))
    reduced = tuple(f"r_{name}" for name in REDUCERS) if n_scales > 0 else ()
    return _CONTEXT + matrix + reduced + (_LOCAL if local else ())


def pair_features(
    similarities: np.ndarray,
    labels: np.ndarray,
    matrices: np.ndarray | None = None,
    matches: np.ndarray | None = None,
) -> np.ndarray:
    """Pair features ``(Q, V, F)`` float32 for shortlists of ``V`` neighbours per query.

    ``similarities`` ``(Q, V)`` ranked best first and ``labels`` ``(Q, V)`` the neighbours' labels;
    ``matrices`` ``(Q, V, S, S)`` the multi-scale similarity matrices (None: no matrix features);
    ``matches`` ``(Q, V, 2)`` the ratio-test matches and RANSAC inliers (None: no local features).
    """
    sims = np.asarray(similarities, dtype=np.float64)
    labels = np.asarray(labels, dtype=object)
    if sims.ndim != 2 or labels.shape != sims.shape or sims.shape[1] == 0:
        raise ConfigError(
            f"similarities and labels must both be (Q, V > 0), got {sims.shape}, {labels.shape}"
        )
    q, v = sims.shape
    rank = np.broadcast_to(np.log1p(np.arange(v, dtype=np.float64)), (q, v))
    top = np.broadcast_to(sims[:, :1], (q, v))
    agreement = np.array([[np.mean(row == label) for label in row] for row in labels]).reshape(q, v)
    parts = [sims, rank, top, top - sims, agreement]
    columns = [p[..., None] for p in parts]
    if matrices is not None:
        m = np.asarray(matrices, dtype=np.float64)
        if m.ndim != 4 or m.shape[:2] != (q, v) or m.shape[2] != m.shape[3]:
            raise ConfigError(f"matrices must be (Q, V, S, S) = ({q}, {v}, S, S), got {m.shape}")
        flat = m.reshape(q * v, m.shape[2], m.shape[3])
        columns.append(m.reshape(q, v, -1))
        columns.append(np.stack([r(flat) for r in REDUCERS.values()], axis=1).reshape(q, v, -1))
    if matches is not None:
        counts = np.asarray(matches, dtype=np.float64)
        if counts.shape != (q, v, 2):
            raise ConfigError(f"matches must be (Q, V, 2) = ({q}, {v}, 2), got {counts.shape}")
        columns.append(np.log1p(np.maximum(counts, 0.0)))
    return np.concatenate(columns, axis=2).astype(np.float32)


# ---- computing the pair features of shortlists -----------------------------------------------------------


class PairFeaturizer:
    """Pair features for shortlists over one image set: per-scale descriptors ``(N, S, D)`` and, when a
    ``cache`` of local features is given, the files ``paths`` (N,) for SIFT matching.

    Query and neighbour are both indices into that set. Match counts are remembered per (query,
    neighbour), so a pair shortlisted again (another fold, another variant) is matched once.
    """

    def __init__(
        self,
        descriptors: np.ndarray,
        paths: Sequence[str | Path] | None = None,
        cache: LocalFeatureCache | None = None,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        self.descriptors = np.asarray(descriptors)
        if self.descriptors.ndim != 3:
            raise ConfigError(f"descriptors must be (N, S, D), got {self.descriptors.shape}")
        if cache is not None and (paths is None or len(paths) != len(self.descriptors)):
            raise ConfigError("local features need one path per descriptor")
        self.paths = [Path(p) for p in paths] if paths is not None else None
        self.cache = cache
        self.progress = progress
        self._matches: dict[tuple[int, int], MatchResult] = {}

    @property
    def local(self) -> bool:
        return self.cache is not None

    @property
    def names(self) -> tuple[str, ...]:
        return feature_names(self.descriptors.shape[1], self.local)

    def match(self, query: int, reference: int) -> MatchResult:
        """Ratio-test matches and RANSAC inliers from image ``query`` to image ``reference``."""
        key = (int(query), int(reference))
        if key not in self._matches:
            assert self.cache is not None and self.paths is not None
            a, b = self.cache.get(self.paths[key[0]]), self.cache.get(self.paths[key[1]])
            self._matches[key] = match_features(a, b)
        return self._matches[key]

    def __call__(
        self, queries: np.ndarray, ids: np.ndarray, similarities: np.ndarray, labels: np.ndarray
    ) -> np.ndarray:
        """Features ``(Q, V, F)`` for image indices ``queries`` (Q,) and their shortlists ``ids`` (Q, V)."""
        queries = np.asarray(queries, dtype=np.int64)
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim != 2 or ids.shape[0] != queries.shape[0]:
            raise ConfigError(f"shortlists must be (Q, V) for {queries.shape[0]} queries, got {ids.shape}")
        x = self.descriptors
        matrices = np.stack([similarity_matrices(x[q], x[row]) for q, row in zip(queries, ids, strict=True)])
        matches = None
        if self.local:
            matches = np.zeros((*ids.shape, 2))
            for i, (q, row) in enumerate(zip(queries, ids, strict=True)):
                for j, r in enumerate(row):
                    matches[i, j] = self.match(q, r)
                if self.progress is not None:
                    self.progress(i + 1, len(queries))
        return pair_features(similarities, labels, matrices, matches)


# ---- the model -------------------------------------------------------------------------------------------


def relu(x: np.ndarray) -> np.ndarray:
    """The MLP's hidden activation, ``max(x, 0)``."""
    return np.maximum(x, 0.0)


def sigmoid(z: np.ndarray) -> np.ndarray:
    """The logistic function through ``tanh``, which does not overflow for large ``|z|``."""
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclass(frozen=True, eq=False)
class PairVerifier:
    """``P(same class)`` for pair features: standardise with ``mean``/``scale``, then a logistic
    regression (``weights = (w (F, 1),)``) or an MLP (``(W1 (F, H), W2 (H, 1))``, ReLU) with ``biases``."""

    names: tuple[str, ...]
    mean: np.ndarray
    scale: np.ndarray
    weights: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]

    def __post_init__(self) -> None:
        f = len(self.names)
        if self.mean.shape != (f,) or self.scale.shape != (f,) or not (self.scale > 0).all():
            raise ConfigError(f"a verifier over {f} features needs mean and positive scale of shape ({f},)")
        if len(self.weights) not in (1, 2) or len(self.biases) != len(self.weights):
            raise ConfigError("a verifier has one (logistic) or two (MLP) layers")
        width = f
        for w, b in zip(self.weights, self.biases, strict=True):
            if w.ndim != 2 or w.shape[0] != width or b.shape != (w.shape[1],):
                raise ConfigError(f"layer shapes do not chain: weights {w.shape}, biases {b.shape}")
            width = w.shape[1]
        if width != 1:
            raise ConfigError(f"the last layer must have one output, got {width}")

    @property
    def hidden(self) -> int:
        """Width of the hidden layer, 0 for a logistic regression."""
        return 0 if len(self.weights) == 1 else int(self.weights[0].shape[1])

    def _logits(self, z: np.ndarray) -> np.ndarray:
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            z = z @ w + b
            if i + 1 < len(self.weights):
                z = relu(z)
        return z[..., 0]

    def probability(self, features: np.ndarray) -> np.ndarray:
        """``P(same)`` for features ``(..., F)``, float64 of shape ``(...)``."""
        x = np.asarray(features, dtype=np.float64)
        if x.shape[-1:] != (len(self.names),):
            raise ConfigError(f"expected {len(self.names)} pair features, got shape {x.shape}")
        return sigmoid(self._logits((x - self.mean) / self.scale))

    def save(self, path: str | Path) -> None:
        """Write the model as plain arrays (no pickle)."""
        layers = {f"w{i}": w for i, w in enumerate(self.weights)}
        layers |= {f"b{i}": b for i, b in enumerate(self.biases)}
        save_npz_atomic(
            path,
            version=np.array(_FORMAT_VERSION, dtype=np.int64),
            names=np.array(self.names, dtype=str),
            mean=self.mean,
            scale=self.scale,
            layers=np.array(len(self.weights), dtype=np.int64),
            **layers,
        )

    @classmethod
    def load(cls, path: str | Path) -> PairVerifier:
        """Read a model written by :meth:`save`."""
        with np.load(path, allow_pickle=False) as data:
            if int(data["version"]) != _FORMAT_VERSION:
                raise ConfigError(
                    f"{path}: verifier format {int(data['version'])}, expected {_FORMAT_VERSION}"
                )
            n = int(data["layers"])
            return cls(
                names=tuple(str(s) for s in data["names"]),
                mean=data["mean"].astype(np.float64),
                scale=data["scale"].astype(np.float64),
                weights=tuple(data[f"w{i}"].astype(np.float64) for i in range(n)),
                biases=tuple(data[f"b{i}"].astype(np.float64) for i in range(n)),
            )


def rescore(similarities: np.ndarray, probabilities: np.ndarray, rule: str = "product") -> np.ndarray:
    """Shortlist scores for the vote: ``s · p`` (``"product"``, negative ``s`` clipped to 0) or ``p``."""
    if rule not in RULES:
        raise ConfigError(f"unknown re-scoring rule {rule!r}; expected one of {', '.join(RULES)}")
    p = np.asarray(probabilities, dtype=np.float64)
    if rule == "probability":
        return p
    return np.maximum(np.asarray(similarities, dtype=np.float64), 0.0) * p


def rerank(
    similarities: np.ndarray, ids: np.ndarray, probabilities: np.ndarray, rule: str = "product"
) -> tuple[np.ndarray, np.ndarray]:
    """Shortlists ``(Q, V)`` re-scored by :func:`rescore` and re-sorted, best first (ties keep the order)."""
    scores = rescore(similarities, probabilities, rule)
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(scores, order, axis=1), np.take_along_axis(np.asarray(ids), order, axis=1)


__all__ = [
    "RULES",
    "PairFeaturizer",
    "PairVerifier",
    "feature_names",
    "pair_features",
    "rerank",
    "rescore",
]
