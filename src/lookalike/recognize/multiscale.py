"""Multi-scale recognition: descriptors at S scales per image, compared scale by scale or aggregated.

A multi-scale descriptor array is ``(N, S, D)`` float32: image ``n`` at scale ``s`` is the L2-normalised row
``x[n, s]`` (default scales :data:`DEFAULT_SCALES`). Two ways to use them:

* **Similarity matrices.** For a query ``q`` ``(S, D)`` and a reference ``r`` ``(S, D)`` the matrix is
  ``M = q rᵀ`` ``(S, S)``: ``M[i, j]`` compares query scale ``i`` (row) with reference scale ``j``
  (column). A reducer from :data:`REDUCERS` turns ``M`` into one similarity:

  ==================  ==========================================================================
  ``max``             ``max_ij M[i, j]``
  ``sum_row_max``     ``Σ_i max_j M[i, j]`` — each query scale takes its best reference scale
  ``sum_col_max``     ``Σ_j max_i M[i, j]`` — each reference scale takes its best query scale
  ``sum_row_max_sq``  ``Σ_i max(max_j M[i, j], 0)²`` — squared row maxima, negative maxima count 0
  ``sum_col_max_sq``  ``Σ_j max(max_i M[i, j], 0)²``
  ``mean``            ``Σ_ij M[i, j] / S²`` — the plain mean, the sixth reducer
  ==================  ==========================================================================

  The squared variants clip negative maxima at 0 like the ``square`` transform, so that every reducer
  is non-decreasing in every entry. The summed reducers range over ``[-S, S]``, not ``[-1, 1]``.
  :class:`MultiScaleKnn` computes the matrices only for a shortlist from a global search and votes
  over the reduced similarities.

* **Aggregation.** ``x_w = L2(Σ_i w_i x[:, i])`` for a binary weight vector ``w`` ``(S,)``
  (:func:`aggregate`, :func:`binary_weight_vectors`); :class:`AggregatedClassifier` then PCA-whitens
  (by default) and classifies with any :class:`~lookalike.recognize.knn.KnnClassifier`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final

import numpy as np

from lookalike.errors import ConfigError
from lookalike.recognize.knn import (
    BACKENDS,
    DEFAULT_K,
    KnnClassifier,
    Prediction,
    Transform,
    as_labels,
    as_unit_rows,
    exact_search,
    get_transform,
    knn_classify,
)
from lookalike.whitening import Whitening, fit_pca_whitening

Reducer = Callable[[np.ndarray], np.ndarray]

DEFAULT_SCALES: Final = (0.25, 0.5, 1 / math.sqrt(2), 1.0, math.sqrt(2))
DEFAULT_SHORTLIST: Final = 100


# ---- similarity matrices and reducers --------------------------------------------------------------------


def similarity_matrices(q: np.ndarray, refs: np.ndarray) -> np.ndarray:
    """``(M, S, S)`` matrices ``q refs[m]ᵀ`` for a query ``(S, D)`` and references ``(M, S, D)``.

    Rows index the query's scales, columns the reference's. Computed in float64.
    """
    q = np.asarray(q, dtype=np.float64)
    refs = np.asarray(refs, dtype=np.float64)
    if q.ndim != 2 or refs.ndim != 3 or refs.shape[1:] != q.shape:
        raise ConfigError(
            f"similarity matrices need a query (S, D) and references (M, S, D), got {q.shape}, {refs.shape}"
        )
    return np.einsum("id,mjd->mij", q, refs)


def _row_max(m: np.ndarray) -> np.ndarray:
    return m.max(axis=2)


def _col_max(m: np.ndarray) -> np.ndarray:
    return m.max(axis=1)


def reduce_max(m: np.ndarray) -> np.ndarray:
    """``max_ij M[i, j]`` per matrix of ``(M, S, S)``."""
    return m.max(axis=(1, 2))


def sum_row_max(m: np.ndarray) -> np.ndarray:
    """``Σ_i max_j M[i, j]``: the best reference scale for each query scale, summed."""
    return _row_max(m).sum(axis=1)


def sum_col_max(m: np.ndarray) -> np.ndarray:
    """``Σ_j max_i M[i, j]``: the best query scale for each reference scale, summed."""
    return _col_max(m).sum(axis=1)


def sum_row_max_sq(m: np.ndarray) -> np.ndarray:
    """``Σ_i max(max_j M[i, j], 0)²``: squared row maxima, negative ones counting 0."""
    return np.square(np.maximum(_row_max(m), 0.0)).sum(axis=1)


def sum_col_max_sq(m: np.ndarray) -> np.ndarray:
    """``Σ_j max(max_i M[i, j], 0)²``: squared column maxima, negative ones counting 0."""
    return np.square(np.maximum(_col_max(m), 0.0)).sum(axis=1)


def reduce_mean(m: np.ndarray) -> np.ndarray:
    """``Σ_ij M[i, j] / S²``: the mean of every pair of scales."""
    return m.mean(axis=(1, 2))


REDUCERS: Final[Mapping[str, Reducer]] = MappingProxyType(
    {
        "max": reduce_max,
        "sum_row_max": sum_row_max,
        "sum_col_max": sum_col_max,
        "sum_row_max_sq": sum_row_max_sq,
        "sum_col_max_sq": sum_col_max_sq,
        "mean": reduce_mean,
    }
)


def get_reducer(reducer: str | Reducer) -> Reducer:
    """A reducer from its name in :data:`REDUCERS`, or the callable itself (``(M, S, S) -> (M,)``)."""
    if callable(reducer):
        return reducer
    if reducer not in REDUCERS:
        raise ConfigError(f"unknown reducer {reducer!r}; expected one of {', '.join(REDUCERS)}")
    return REDUCERS[reducer]


# ---- aggregation -----------------------------------------------------------------------------------------


def _l2n(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def aggregate(x: np.ndarray, weights: np.ndarray | Sequence[float]) -> np.ndarray:
    """``L2(Σ_i w_i x[:, i])``: ``(N, S, D)`` descriptors and weights ``(S,)`` to ``(N, D)`` float32 rows.

    The weights are meant to be binary (choose scales) but any finite, not-all-zero weights work. A sum
    that cancels to zero stays zero.
    """
    x = np.asarray(x)
    w = np.asarray(weights, dtype=np.float64)
    if x.ndim != 3 or w.shape != (x.shape[1],):
        raise ConfigError(
            f"aggregation needs descriptors (N, S, D) and weights (S,), got {x.shape} and {w.shape}"
        )
    if not np.isfinite(w).all() or not w.any():
        raise ConfigError(f"aggregation weights must be finite and not all zero, got {w}")
    return _l2n(np.einsum("s,nsd->nd", w, x.astype(np.float64))).astype(np.float32)


def binary_weight_vectors(s: int) -> np.ndarray:
    """Every non-zero binary weight vector for ``s`` scales, ``(2^s − 1, s)`` float32.

    Row ``m − 1`` is the binary expansion of ``m`` with bit ``i`` selecting scale ``i``: for ``s = 3``
    the rows are ``100, 010, 110, 001, 101, 011, 111``.
    """
    if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= 20:
        raise ConfigError(f"number of scales must be an integer in 1..20, got {s!r}")
    m = np.arange(1, 2**s)[:, None]
    return ((m >> np.arange(s)) & 1).astype(np.float32)


# ---- per-scale whitening ---------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MultiScaleWhitening:
    """One :class:`~lookalike.whitening.Whitening` per scale, applied to ``(N, S, D)`` descriptors."""

    whitenings: tuple[Whitening, ...]

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whiten each scale with its own whitening: ``(N, S, D)`` to L2-normalised ``(N, S, D_out)``."""
        x = np.asarray(x)
        if x.ndim != 3 or x.shape[1] != len(self.whitenings):
            raise ConfigError(f"expected descriptors (N, {len(self.whitenings)}, D), got {x.shape}")
        return np.stack([w.apply(x[:, i]) for i, w in enumerate(self.whitenings)], axis=1)


def fit_multiscale_whitening(x: np.ndarray, dim: int | None = None) -> MultiScaleWhitening:
    """PCA-whitening fitted separately on each scale of ``x`` ``(N, S, D)``."""
    x = as_unit_rows(x, "multi-scale descriptors", ndim=3)
    return MultiScaleWhitening(tuple(fit_pca_whitening(x[:, i], dim) for i in range(x.shape[1])))


# ---- classifiers -----------------------------------------------------------------------------------------


class MultiScaleKnn:
    """k-NN voting over reduced multi-scale similarities, computed for a shortlist only.

    1. With ``whiten=True`` each scale is PCA-whitened separately, fitted on the references.
    2. A global exact search takes the top ``shortlist`` references by the descriptor at scale index
       ``shortlist_scale``, or (``None``, the default) by the aggregate of all scales, ``L2(Σ_i x_i)``.
    3. For each shortlisted reference the ``(S, S)`` similarity matrix is reduced with ``reducer``; the
       ``k`` best by reduced similarity (ties: earlier in the shortlist) vote as in
       :func:`~lookalike.recognize.knn.knn_classify`, with ``f`` = ``transform`` of the reduced
       similarity. ``k = 1`` is 1-NN. Neighbour similarities in the predictions are reduced ones.
    """

    def __init__(
        self,
        reducer: str | Reducer = "sum_row_max",
        k: int = DEFAULT_K,
        transform: str | Transform = "identity",
        shortlist: int = DEFAULT_SHORTLIST,
        shortlist_scale: int | None = None,
        whiten: bool = False,
        whiten_dim: int | None = None,
        backend: str = "numpy",
    ) -> None:
        for name, value in (("k", k), ("shortlist", shortlist)):
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if k > shortlist:
            raise ConfigError(f"k = {k} neighbours cannot come from a shortlist of {shortlist}")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown search backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if whiten_dim is not None and not whiten:
            raise ConfigError("whiten_dim is only used with whiten=True")
        self.reducer = get_reducer(reducer)
        self.k = int(k)
        self.transform = get_transform(transform)
        self.shortlist = int(shortlist)
        self.shortlist_scale = shortlist_scale
        self.whiten = whiten
        self.whiten_dim = whiten_dim
        self.backend = backend
        self.whitening: MultiScaleWhitening | None = None
        self._references: np.ndarray | None = None
        self._global: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    def _global_vectors(self, x: np.ndarray) -> np.ndarray:
        if self.shortlist_scale is None:
            return aggregate(x, np.ones(x.shape[1]))
        return np.ascontiguousarray(x[:, self.shortlist_scale])

    def fit(self, references: np.ndarray, labels: Sequence[str] | np.ndarray) -> MultiScaleKnn:
        """Store references ``(N, S, D)`` and labels; fit the per-scale whitenings on them if asked."""
        references = as_unit_rows(references, "references", ndim=3)
        if references.shape[0] == 0:
            raise ConfigError("a kNN classifier needs at least one reference")
        s = references.shape[1]
        if self.shortlist_scale is not None and not 0 <= self.shortlist_scale < s:
            raise ConfigError(
                f"shortlist_scale must be a scale index in 0..{s - 1}, got {self.shortlist_scale}"
            )
        self._labels = as_labels(labels, references.shape[0])
        if self.whiten:
            self.whitening = fit_multiscale_whitening(references, self.whiten_dim)
            references = self.whitening.apply(references)
        self._references = references
        self._global = self._global_vectors(references)
        return self

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """Queries ``(Q, S, D)`` as compared: checked and, if fitted so, whitened per scale."""
        if self._references is None:
            raise ConfigError("the classifier is not fitted; call fit(references, labels) first")
        queries = as_unit_rows(queries, "queries", ndim=3)
        if self.whitening is not None:
            queries = self.whitening.apply(queries)
        if queries.shape[1:] != self._references.shape[1:]:
            raise ConfigError(f"queries are (Q, S, D) = {queries.shape}, references {self._references.shape}")
        return queries

    def reduced_neighbours(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reduced similarities and reference ids of the ``k`` best of each query's shortlist, ``(Q, k')``
        each with ``k' = min(k, N)``, best first."""
        return self.neighbours_by_reducer(queries, {"": self.reducer})[""]

    def neighbours_by_reducer(
        self, queries: np.ndarray, reducers: Mapping[str, str | Reducer]
    ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """:meth:`reduced_neighbours` for each of several reducers (name → reducer) in place of this
        classifier's own: one shortlist search and one similarity matrix per pair serve them all."""
        xq = self.prepare(queries)
        assert self._references is not None and self._global is not None
        functions = {name: get_reducer(r) for name, r in reducers.items()}
        _, short = exact_search(self._global_vectors(xq), self._global, self.shortlist, self.backend)
        k = min(self.k, short.shape[1])
        out = {
            name: (np.empty((xq.shape[0], k)), np.empty((xq.shape[0], k), dtype=np.int64))
            for name in functions
        }
        for q in range(xq.shape[0]):
            matrices = similarity_matrices(xq[q], self._references[short[q]])
            for name, reducer in functions.items():
                reduced = np.asarray(reducer(matrices))
                best = np.argsort(-reduced, kind="stable")[:k]
                out[name][0][q], out[name][1][q] = reduced[best], short[q, best]
        return out

    def predict(self, queries: np.ndarray) -> list[Prediction]:
        """One :class:`~lookalike.recognize.knn.Prediction` per query ``(S, D)`` of ``queries``."""
        sims, ids = self.reduced_neighbours(queries)
        assert self._labels is not None
        return knn_classify(sims, self._labels[ids], self.transform, ids)


class AggregatedClassifier:
    """Aggregate the scales chosen by ``weights`` (:func:`aggregate`), then classify with ``classifier``
    (default ``KnnClassifier(whiten=True)``: PCA-whitening fitted on the aggregated references, k-NN)."""

    def __init__(
        self, weights: np.ndarray | Sequence[float], classifier: KnnClassifier | None = None
    ) -> None:
        self.weights = np.asarray(weights, dtype=np.float64)
        if self.weights.ndim != 1 or not np.isfinite(self.weights).all() or not self.weights.any():
            raise ConfigError(f"weights must be a finite, not-all-zero vector (S,), got {self.weights}")
        self.classifier = KnnClassifier(whiten=True) if classifier is None else classifier

    def fit(self, references: np.ndarray, labels: Sequence[str] | np.ndarray) -> AggregatedClassifier:
        """Fit the classifier on the aggregated references ``(N, S, D)``."""
        self.classifier.fit(aggregate(as_unit_rows(references, "references", ndim=3), self.weights), labels)
        return self

    @property
    def references(self) -> np.ndarray:
        """The aggregated references as the classifier compares them (whitened if fitted so)."""
        return self.classifier.references

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """Queries ``(Q, S, D)`` aggregated and prepared as the classifier compares them."""
        return self.classifier.prepare(aggregate(as_unit_rows(queries, "queries", ndim=3), self.weights))

    def predict(self, queries: np.ndarray) -> list[Prediction]:
        """Predictions for the aggregated queries ``(Q, S, D)``."""
        return self.classifier.predict(aggregate(as_unit_rows(queries, "queries", ndim=3), self.weights))


__all__ = [
    "DEFAULT_SCALES",
    "REDUCERS",
    "AggregatedClassifier",
    "MultiScaleKnn",
    "MultiScaleWhitening",
    "Reducer",
    "aggregate",
    "binary_weight_vectors",
    "fit_multiscale_whitening",
    "get_reducer",
    "reduce_max",
    "reduce_mean",
    "similarity_matrices",
    "sum_col_max",
    "sum_col_max_sq",
    "sum_row_max",
    "sum_row_max_sq",
]
