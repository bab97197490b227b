"""k-nearest-neighbour recognition over global descriptors: transforms, voting rules and a classifier.

Descriptors are ``(N, D)`` float32 L2-normalised rows, so the inner product is the cosine similarity.
Each query gets a :class:`Prediction` (a label, a confidence and the neighbours used), ready to be scored
by micro-AP / GAP: predictions are ranked by confidence across all queries.

Definitions (``f`` is a similarity transform from :data:`TRANSFORMS`):

* **k-NN** — the score of class ``c`` is ``Σ f(s_j)`` over the ``k`` neighbours ``j`` labelled ``c``.
* **1-NN** — the label of the nearest neighbour; confidence ``f(s_1)``.
* **mean k-NN** — for each class ``c`` among the ``k`` neighbours, ``μ_c`` is the L2-normalised mean of
  the neighbours labelled ``c``; the score is ``f(q · μ_c)``.
* **α-expanded mean k-NN** — as mean k-NN, but ``μ_c`` is the L2-normalised mean of *every* reference of
  class ``c`` within Euclidean distance ``α`` of *some* neighbour of class ``c`` (the neighbours themselves
  always count). On unit vectors ``‖x − y‖ = sqrt(2 − 2 x·y)``, so ``α`` lives in ``[0, 2]``:
  ``α = 0`` is mean k-NN, ``α = 2`` takes the whole class.

In all rules the prediction is the class with the largest score and the confidence is that score.

Ranking and ties, deterministic everywhere: neighbours are ranked by similarity, descending, and equal
similarities by their position in the input (the exact search puts the lower reference index first).
Class scores within ``TIE_TOLERANCE · max(1, |best|)`` of the best count as tied (sums of the same
numbers in another order differ in the last bits); among tied classes the one whose nearest neighbour
ranks highest wins — "the class of the nearest neighbour among the tied".
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final, NamedTuple

import numpy as np

from lookalike.errors import ConfigError
from lookalike.whitening import Whitening, fit_pca_whitening

_log = logging.getLogger(__name__)

Transform = Callable[[np.ndarray], np.ndarray]

TIE_TOLERANCE: Final = 1e-6
UNIT_TOLERANCE: Final = 1e-3
METHODS: Final = ("knn", "1nn", "mean", "alpha")
BACKENDS: Final = ("numpy", "faiss")
DEFAULT_K: Final = 5
_SEARCH_BLOCK: Final = 1 << 24  # similarities held at once by the numpy search (64 MB of float32)


# ---- similarity transforms -------------------------------------------------------------------------------


def identity(x: np.ndarray) -> np.ndarray:
    """``f(x) = x``. Negative similarities stay negative and lower their class's score."""
    return np.asarray(x, dtype=np.float64)


def square(x: np.ndarray) -> np.ndarray:
    """``f(x) = max(x, 0)²``: close neighbours count for much more. Negative similarities give 0
    (squaring them would turn dissimilar neighbours into evidence)."""
    return np.square(np.maximum(np.asarray(x, dtype=np.float64), 0.0))


def sqrt(x: np.ndarray) -> np.ndarray:
    """``f(x) = sqrt(max(x, 0))``: flattens the differences between neighbours. Negative similarities
    (no evidence for the class) are clipped to 0, which keeps the root real."""
    return np.sqrt(np.maximum(np.asarray(x, dtype=np.float64), 0.0))


def log(x: np.ndarray) -> np.ndarray:
    """``f(x) = ln(x + e)``, so ``f(0) = 1``, ``f(1) = ln(1 + e)`` and ``f`` stays positive on cosines.
    Values below −1 (possible only for the summed multi-scale similarities) are clipped to −1."""
    return np.log(np.maximum(np.asarray(x, dtype=np.float64), -1.0) + np.e)


TRANSFORMS: Final[Mapping[str, Transform]] = MappingProxyType(
    {"identity": identity, "square": square, "sqrt": sqrt, "log": log}
)


def get_transform(transform: str | Transform) -> Transform:
    """A transform from its name in :data:`TRANSFORMS`, or the callable itself (elementwise, monotone)."""
    if callable(transform):
        return transform
    if transform not in TRANSFORMS:
        raise ConfigError(
            f"unknown similarity transform {transform!r}; expected one of {', '.join(TRANSFORMS)}"
        )
    return TRANSFORMS[transform]


# ---- results ---------------------------------------------------------------------------------------------


class Neighbour(NamedTuple):
    """A neighbour used for a prediction: reference index ``id`` (−1 when not known), label, similarity."""

    id: int
    label: str
    similarity: float


@dataclass(frozen=True)
class Prediction:
    """One query's answer. ``label`` is None (and ``confidence`` −inf, below every real prediction) only
    when the query had no neighbour. ``neighbours`` are ranked nearest first."""

    label: str | None
    confidence: float
    neighbours: tuple[Neighbour, ...] = ()


NO_PREDICTION: Final = Prediction(None, float("-inf"), ())


# ---- input checks ----------------------------------------------------------------------------------------


def as_unit_rows(x: np.ndarray, name: str, ndim: int = 2) -> np.ndarray:
    """``x`` as float32 with ``ndim`` axes whose last-axis rows are L2-normalised, else :class:`ConfigError`."""
    x = np.asarray(x)
    if x.ndim != ndim or not np.issubdtype(x.dtype, np.number) or x.shape[-1] == 0:
        raise ConfigError(
            f"{name} must be a numeric array with {ndim} axes and D > 0, got {x.dtype} {x.shape}"
        )
    x = np.ascontiguousarray(x, dtype=np.float32)
    if not np.isfinite(x).all():
        raise ConfigError(f"{name} contain NaN or infinity")
    norms = np.linalg.norm(x, axis=-1)
    if norms.size and np.abs(norms - 1.0).max() > UNIT_TOLERANCE:
        raise ConfigError(
            f"{name} must have L2-normalised rows; norms range {norms.min():.4g}..{norms.max():.4g}"
        )
    return x


def as_labels(labels: Sequence[str] | np.ndarray, n: int) -> np.ndarray:
    """``labels`` as an object array of ``n`` strings, else :class:`ConfigError`."""
    out = np.empty(len(labels), dtype=object)
    out[:] = list(labels)
    if out.shape != (n,):
        raise ConfigError(f"expected {n} labels, one per reference, got {len(labels)}")
    bad = [label for label in out if not isinstance(label, str)]
    if bad:
        raise ConfigError(f"labels must be strings, got {type(bad[0]).__name__} {bad[0]!r}")
    return out


def _check_k(k: int, what: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"{what} must be a positive integer, got {k!r}")
    return int(k)


# ---- exact neighbour search ------------------------------------------------------------------------------


def _topk_rows(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each row of ``sims`` by (similarity desc, column asc); ``k <= sims.shape[1]``."""
    n = sims.shape[1]
    ids = np.empty((sims.shape[0], k), dtype=np.int64)
    kth = np.partition(sims, n - k, axis=1)[:, n - k]  # k-th largest similarity of each row
    for row, (s, t) in enumerate(zip(sims, kth, strict=True)):
        candidates = np.flatnonzero(s >= t)  # every tie at the cut is a candidate, ascending
        order = np.argsort(-s[candidates], kind="stable")[:k]
        ids[row] = candidates[order]
    return np.take_along_axis(sims, ids, axis=1), ids


def exact_search(
    xq: np.ndarray, xb: np.ndarray, k: int, backend: str = "numpy"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search: similarities ``D`` and reference ids ``I``, both ``(Q, min(k, N))``.

    ``"numpy"`` breaks equal similarities by the lower reference index; ``"faiss"`` (``IndexFlatIP``) is
    exact too but leaves the order of equal similarities to faiss.
    """
    k = _check_k(k)
    if backend not in BACKENDS:
        raise ConfigError(f"unknown search backend {backend!r}; expected one of {', '.join(BACKENDS)}")
    xq = np.ascontiguousarray(xq, dtype=np.float32)
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    if xq.ndim != 2 or xb.ndim != 2 or xq.shape[1] != xb.shape[1] or xb.shape[0] == 0:
        raise ConfigError(
            f"search needs queries (Q, D) and references (N > 0, D), got {xq.shape} and {xb.shape}"
        )
    k = min(k, xb.shape[0])
    if backend == "faiss":
        import faiss

        index = faiss.IndexFlatIP(xb.shape[1])
        index.add(xb)
        sims, ids = index.search(xq, k)
        return sims, ids.astype(np.int64)
    sims = np.empty((xq.shape[0], k), dtype=np.float32)
    ids = np.empty((xq.shape[0], k), dtype=np.int64)
    block = max(1, _SEARCH_BLOCK // xb.shape[0])
    for start in range(0, xq.shape[0], block):
        stop = start + block
        sims[start:stop], ids[start:stop] = _topk_rows(xq[start:stop] @ xb.T, k)
    return sims, ids


# ---- voting ----------------------------------------------------------------------------------------------


def _ranked(sims: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Positions of the valid entries of one row, by similarity desc then position asc."""
    positions = np.flatnonzero(valid)
    return positions[np.argsort(-sims[positions], kind="stable")]


def _pick(scores: dict[str, float]) -> tuple[str, float]:
    """The best class of ``scores``, whose insertion order is the rank of each class's nearest neighbour."""
    best = max(scores.values())
    cut = best - TIE_TOLERANCE * max(1.0, abs(best))
    label = next(c for c, s in scores.items() if s >= cut)
    return label, scores[label]


def _neighbour_rows(
    sims: np.ndarray, labels: np.ndarray, ids: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    sims = np.asarray(sims, dtype=np.float64)
    labels = np.asarray(labels, dtype=object)
    if sims.ndim != 2 or labels.shape != sims.shape:
        raise ConfigError(f"similarities and labels must both be (Q, k), got {sims.shape} and {labels.shape}")
    ids = np.full(sims.shape, -1, dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
    if ids.shape != sims.shape:
        raise ConfigError(f"ids must be (Q, k) like the similarities, got {ids.shape} and {sims.shape}")
    return sims, labels, ids


def knn_classify(
    sims: np.ndarray,
    labels: np.ndarray | Sequence[Sequence[str | None]],
    transform: str | Transform = "identity",
    ids: np.ndarray | None = None,
) -> list[Prediction]:
    """k-NN vote: class score ``Σ f(s_j)`` over the neighbours of that class; the best score wins.

    ``sims`` and ``labels`` are ``(Q, k)``; ``ids`` ``(Q, k)`` are the reference indices reported in the
    neighbours (−1 when omitted). A neighbour is missing when its label is None (or its id is negative
    while ``ids`` is given); a query with no neighbour gets ``label=None, confidence=-inf``.
    """
    f = get_transform(transform)
    ids_given = ids is not None
    sims, labels, ids = _neighbour_rows(np.asarray(sims), np.asarray(labels, dtype=object), ids)
    valid = np.array([[label is not None for label in row] for row in labels], dtype=bool).reshape(
        labels.shape
    )
    if ids_given:
        valid &= ids >= 0
    values = f(sims)
    out = []
    for q in range(sims.shape[0]):
        order = _ranked(sims[q], valid[q])
        if order.size == 0:
            out.append(NO_PREDICTION)
            continue
        scores: dict[str, float] = {}
        for j in order:
            scores[labels[q, j]] = scores.get(labels[q, j], 0.0) + float(values[q, j])
        label, confidence = _pick(scores)
        neighbours = tuple(Neighbour(int(ids[q, j]), labels[q, j], float(sims[q, j])) for j in order)
        out.append(Prediction(label, confidence, neighbours))
    return out


def nn_classify(
    sims: np.ndarray,
    labels: np.ndarray | Sequence[Sequence[str | None]],
    transform: str | Transform = "identity",
    ids: np.ndarray | None = None,
) -> list[Prediction]:
    """1-NN: the nearest neighbour's label with confidence ``f(s_1)``; inputs as :func:`knn_classify`."""
    predictions = knn_classify(sims, labels, transform, ids)
    f = get_transform(transform)
    return [
        p
        if p.label is None
        else Prediction(
            p.neighbours[0].label, float(f(np.array(p.neighbours[0].similarity))), p.neighbours[:1]
        )
        for p in predictions
    ]


def _class_groups(order: np.ndarray, labels: np.ndarray) -> dict[str, list[int]]:
    """Neighbour positions grouped by label; classes in the order of their nearest neighbour."""
    groups: dict[str, list[int]] = {}
    for j in order:
        groups.setdefault(labels[j], []).append(int(j))
    return groups


def _unit(v: np.ndarray) -> np.ndarray:
    norm = float(np.linalg.norm(v))
    return v / norm if norm > 1e-12 else v * 0.0


def _mean_vote(
    xq: np.ndarray,
    xb: np.ndarray,
    ref_labels: np.ndarray,
    ids: np.ndarray,
    transform: str | Transform,
    members: Callable[[str, np.ndarray], np.ndarray],
) -> list[Prediction]:
    """Shared body of the mean rules: ``members(c, neighbour_ids)`` gives the references averaged for ``c``."""
    f = get_transform(transform)
    ids = np.asarray(ids, dtype=np.int64)
    if ids.ndim != 2 or ids.shape[0] != xq.shape[0]:
        raise ConfigError(f"ids must be (Q, k) for {xq.shape[0]} queries, got {ids.shape}")
    if ids.size and ids.max() >= xb.shape[0]:
        raise ConfigError(f"neighbour ids must be below the {xb.shape[0]} references, got {ids.max()}")
    out = []
    for q in range(xq.shape[0]):
        row = ids[q]
        valid = row >= 0
        query = xq[q].astype(np.float64)
        sims = np.zeros(row.shape)
        sims[valid] = xb[row[valid]].astype(np.float64) @ query
        order = _ranked(sims, valid)
        if order.size == 0:
            out.append(NO_PREDICTION)
            continue
        labels = ref_labels[np.where(valid, row, 0)]
        scores = {}
        for c, positions in _class_groups(order, labels).items():
            mean = _unit(xb[members(c, row[positions])].astype(np.float64).sum(axis=0))
            scores[c] = float(f(np.array(mean @ query)))
        label, confidence = _pick(scores)
        neighbours = tuple(Neighbour(int(row[j]), labels[j], float(sims[j])) for j in order)
        out.append(Prediction(label, confidence, neighbours))
    return out


def mean_knn_classify(
    xq: np.ndarray,
    xb: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    ids: np.ndarray,
    transform: str | Transform = "identity",
) -> list[Prediction]:
    """Mean k-NN: score ``f(q · μ_c)`` with ``μ_c`` the L2-normalised mean of the neighbours of class ``c``.

    ``xq`` ``(Q, D)`` queries, ``xb`` ``(N, D)`` references with ``labels`` ``(N,)``, ``ids`` ``(Q, k)`` the
    neighbours (negative = missing). Neighbour similarities are recomputed as ``q · x`` in float64. A
    class whose neighbours sum to zero has ``μ_c = 0`` and so similarity 0.
    """
    xq, xb = as_unit_rows(xq, "queries"), as_unit_rows(xb, "references")
    ref_labels = as_labels(labels, xb.shape[0])
    return _mean_vote(xq, xb, ref_labels, ids, transform, lambda _c, neighbour_ids: neighbour_ids)


def alpha_members(
    xb: np.ndarray, class_ids: np.ndarray, neighbour_ids: np.ndarray, alpha: float
) -> np.ndarray:
    """The references among ``class_ids`` within Euclidean distance ``alpha`` of some ``neighbour_ids``,
    together with the neighbours themselves (so rounding never drops them), ascending and unique."""
    cosines = xb[class_ids].astype(np.float64) @ xb[neighbour_ids].astype(np.float64).T
    distances2 = np.maximum(2.0 - 2.0 * cosines, 0.0)
    near = class_ids[(distances2 <= alpha * alpha).any(axis=1)]
    return np.union1d(near, neighbour_ids)


def class_index(labels: np.ndarray) -> dict[str, np.ndarray]:
    """Reference indices of each label, ascending."""
    index: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        index.setdefault(label, []).append(i)
    return {c: np.asarray(v, dtype=np.int64) for c, v in index.items()}


def _check_alpha(alpha: float | None) -> float:
    if alpha is None or not np.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"alpha is a Euclidean distance between unit vectors, in [0, 2]; got {alpha!r}")
    return float(alpha)


def alpha_mean_knn_classify(
    xq: np.ndarray,
    xb: np.ndarray,
    labels: Sequence[str] | np.ndarray,
    ids: np.ndarray,
    alpha: float,
    transform: str | Transform = "identity",
    classes: Mapping[str, np.ndarray] | None = None,
) -> list[Prediction]:
    """α-expanded mean k-NN: as :func:`mean_knn_classify`, but ``μ_c`` averages every reference of class
    ``c`` within Euclidean distance ``alpha`` of a neighbour of class ``c`` (see :func:`alpha_members`).

    ``classes`` (label → reference indices, from :func:`class_index`) may be passed to avoid rebuilding it.
    """
    alpha = _check_alpha(alpha)
    xq, xb = as_unit_rows(xq, "queries"), as_unit_rows(xb, "references")
    ref_labels = as_labels(labels, xb.shape[0])
    classes = class_index(ref_labels) if classes is None else classes
    return _mean_vote(
        xq, xb, ref_labels, ids, transform, lambda c, nids: alpha_members(xb, classes[c], nids, alpha)
    )


# ---- the classifier --------------------------------------------------------------------------------------


class KnnClassifier:
    """Recognition by nearest neighbours among labelled references.

    ``method`` is ``"knn"``, ``"1nn"``, ``"mean"`` or ``"alpha"`` (see the module docstring); ``k``
    defaults to 5 (1 for ``"1nn"``, which accepts no other) and is clipped to the number of references;
    ``alpha`` is required by ``"alpha"`` only. With ``whiten=True``, :meth:`fit` fits PCA-whitening
    (``whiten_dim`` components) on the references only, and references and queries are whitened (and
    L2-normalised) before everything else: search, means and α-distances live in the whitened space.
    ``backend`` picks the exact search (``"numpy"`` or ``"faiss"``).
    """

    def __init__(
        self,
        method: str = "knn",
        k: int | None = None,
        transform: str | Transform = "identity",
        alpha: float | None = None,
        whiten: bool = False,
        whiten_dim: int | None = None,
        backend: str = "numpy",
    ) -> None:
        if method not in METHODS:
            raise ConfigError(f"unknown kNN method {method!r}; expected one of {', '.join(METHODS)}")
        if method == "1nn" and k not in (None, 1):
            raise ConfigError(f"method '1nn' uses k = 1, got k = {k}")
        if (method == "alpha") != (alpha is not None):
            raise ConfigError("alpha is required by method 'alpha' and only used by it")
        if backend not in BACKENDS:
            raise ConfigError(f"unknown search backend {backend!r}; expected one of {', '.join(BACKENDS)}")
        if whiten_dim is not None and not whiten:
            raise ConfigError("whiten_dim is only used with whiten=True")
        self.method = method
        self.k = 1 if method == "1nn" else _check_k(DEFAULT_K if k is None else k)
        self.transform = get_transform(transform)
        self.alpha = _check_alpha(alpha) if method == "alpha" else None
        self.whiten = whiten
        self.whiten_dim = whiten_dim
        self.backend = backend
        self.whitening: Whitening | None = None
        self._references: np.ndarray | None = None
        self._labels: np.ndarray | None = None
        self._classes: dict[str, np.ndarray] = {}

    def fit(self, references: np.ndarray, labels: Sequence[str] | np.ndarray) -> KnnClassifier:
        """Store the references ``(N, D)`` and their labels; fit the whitening on them if asked."""
        references = as_unit_rows(references, "references")
        if references.shape[0] == 0:
            raise ConfigError("a kNN classifier needs at least one reference")
        self._labels = as_labels(labels, references.shape[0])
        if self.whiten:
            self.whitening = fit_pca_whitening(references, self.whiten_dim)
            references = self.whitening.apply(references)
        self._references = references
        self._classes = class_index(self._labels) if self.method == "alpha" else {}
        _log.debug(
            "kNN classifier fitted on %d references, %d labels", len(references), len(set(self._labels))
        )
        return self

    def _fitted(self) -> tuple[np.ndarray, np.ndarray]:
        if self._references is None or self._labels is None:
            raise ConfigError("the classifier is not fitted; call fit(references, labels) first")
        return self._references, self._labels

    @property
    def references(self) -> np.ndarray:
        """The fitted references ``(N, D')`` as the classifier compares them (whitened if fitted so)."""
        return self._fitted()[0]

    def prepare(self, queries: np.ndarray) -> np.ndarray:
        """Queries ``(Q, D)`` as the classifier compares them: checked and, if fitted so, whitened."""
        references, _ = self._fitted()
        queries = as_unit_rows(queries, "queries")
        if self.whitening is not None:
            queries = self.whitening.apply(queries)
        if queries.shape[1] != references.shape[1]:
            raise ConfigError(
                f"queries have dimension {queries.shape[1]}, the references {references.shape[1]}"
            )
        return queries

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Similarities and reference ids of the ``min(k, N)`` nearest references, ``(Q, k)`` each."""
        references, _ = self._fitted()
        return exact_search(self.prepare(queries), references, self.k, self.backend)

    def predict(self, queries: np.ndarray) -> list[Prediction]:
        """One :class:`Prediction` per query row."""
        references, labels = self._fitted()
        xq = self.prepare(queries)
        sims, ids = exact_search(xq, references, self.k, self.backend)
        if self.method == "knn":
            return knn_classify(sims, labels[ids], self.transform, ids)
        if self.method == "1nn":
            return nn_classify(sims, labels[ids], self.transform, ids)
        if self.method == "mean":
            return _mean_vote(xq, references, labels, ids, self.transform, lambda _c, nids: nids)
        alpha, classes = self.alpha, self._classes
        assert alpha is not None
        return _mean_vote(
            xq,
            references,
            labels,
            ids,
            self.transform,
            lambda c, nids: alpha_members(references, classes[c], nids, alpha),
        )


__all__ = [
    "BACKENDS",
    "METHODS",
    "TIE_TOLERANCE",
    "TRANSFORMS",
    "KnnClassifier",
    "Neighbour",
    "Prediction",
    "Transform",
    "alpha_mean_knn_classify",
    "alpha_members",
    "class_index",
    "exact_search",
    "get_transform",
    "identity",
    "knn_classify",
    "log",
    "mean_knn_classify",
    "nn_classify",
    "sqrt",
    "square",
]
