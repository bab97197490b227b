"""Re-ranking by diffusion on the database's kNN graph (Iscen, Tolias, Avrithis, Furon & Chum, "Efficient
diffusion on region manifolds", CVPR 2017), the global-descriptor version of the paper's public code and
the revisitop baselines — the maths as functions, the stage a thin object.

Offline, a graph: each database vector linked to its ``k`` nearest others (never itself) with affinity
``a_ij = max(s_ij, 0)^γ``; with ``mutual`` only reciprocal neighbours are kept, otherwise
``W = max(A, Aᵀ)``; then ``S = D^-1/2 W D^-1/2`` (a node without edges stays isolated, at 0).

At query time, ``y`` holds the query's first ``kq`` shortlisted neighbours other than itself (its own id,
``Ranking.own``, weighs 0) with weight ``max(s, 0)^γ``, and the ranking is by ``f`` solving
``(I − α S) f = y`` by conjugate gradient, started from ``y``. Truncated diffusion solves the same on the
sub-graph of the query's first ``truncate`` shortlisted entries, normalised on its own (as the public
code does); ``truncate = 0`` diffuses on the whole graph. ``f ≥ 0``; ``f = 0``: not reached from ``y``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from typing import Final, Protocol, runtime_checkable

import numpy as np

from lookalike.errors import ConfigError
from lookalike.rerank.base import Database, Ranking, as_matrix, exact_search
from lookalike.rerank.registry import register

DEFAULT_K: Final = 50
DEFAULT_KQ: Final = 3  # kq and alpha chosen on Caltech-101 classes disjoint from the evaluated ones
DEFAULT_GAMMA: Final = 3.0
DEFAULT_ALPHA: Final = 0.9  # (benchmarks/diffusion_grid.py): held-out mAP 77.6 -> 82.4
DEFAULT_ITERATIONS: Final = 20
DEFAULT_TOLERANCE: Final = 1e-6
DEFAULT_TRUNCATE: Final = 1000
MAX_K: Final = 1000


@runtime_checkable
class GraphSource(Protocol):
    """A database that keeps (or builds its own way) the kNN graph diffusion needs."""

    def knn_graph(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Entry ids ``(N,)``, each entry's ``k`` nearest other entries' ids ``(N, k)`` int64 (``-1``
        padding) and their similarities ``(N, k)`` float32, best first, as :func:`knn_graph` returns."""
        ...


def knn_graph(
    xb: np.ndarray, k: int, ids: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The kNN graph of ``xb`` (N, D) by exact self-search: ids (default: rows), the ids of each
    vector's ``k`` nearest *other* vectors ``(N, k)`` (``-1`` where N ≤ k) and their similarities
    (``-inf`` there). A duplicate of a vector is a neighbour; the vector itself never is."""
    xb = as_matrix(xb, "database")
    ids = np.arange(len(xb), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    scores, rows = exact_search(xb, xb, k + 1)
    keep = rows != np.arange(len(xb))[:, None]
    order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # others first, in rank order
    kept = np.take_along_axis(keep, order, axis=1)
    neighbours = np.full((len(xb), k), -1, np.int64)
    similarities = np.full((len(xb), k), -np.inf, np.float32)
    width = order.shape[1]
    neighbours[:, :width] = np.where(kept, ids[np.take_along_axis(rows, order, axis=1)], -1)
    similarities[:, :width] = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
    return ids, neighbours, similarities


@dataclass(frozen=True)
class AffinityGraph:
    """A symmetric ``(size, size)`` matrix as its non-zero entries, sorted by row then column: row ``r``
    holds ``cols[indptr[r]:indptr[r + 1]]`` (CSR). float64 values."""

    size: int
    rows: np.ndarray
    cols: np.ndarray
    values: np.ndarray

    @cached_property
    def indptr(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(np.bincount(self.rows, minlength=self.size))])

    def dot(self, x: np.ndarray) -> np.ndarray:
        return np.bincount(self.rows, weights=self.values * x[self.cols], minlength=self.size)

    def degrees(self) -> np.ndarray:
        return np.bincount(self.rows, weights=self.values, minlength=self.size)

    def dense(self) -> np.ndarray:
        out = np.zeros((self.size, self.size))
        out[self.rows, self.cols] = self.values
        return out


def affinity_graph(
    neighbours: np.ndarray, similarities: np.ndarray, gamma: float = DEFAULT_GAMMA, mutual: bool = True
) -> AffinityGraph:
    """``W`` from each node's neighbour rows ``(N, k)`` (``-1``: none) and similarities: ``a_ij =
    max(s_ij, 0)^γ``; ``W = max(A, Aᵀ)``, with ``mutual`` only where i and j list each other."""
    n = len(neighbours)
    rows = np.repeat(np.arange(n, dtype=np.int64), neighbours.shape[1])
    cols = np.asarray(neighbours, np.int64).ravel()
    listed = (cols >= 0) & (cols != rows)
    keys, first = np.unique(rows[listed] * n + cols[listed], return_index=True)  # each edge once
    weights = np.maximum(np.asarray(similarities, np.float64).ravel()[listed][first], 0.0) ** gamma
    rows, cols = keys // n, keys % n
    both = np.concatenate([rows * n + cols, cols * n + rows])  # A and Aᵀ
    order = np.argsort(both, kind="stable")
    keys, start, count = np.unique(both[order], return_index=True, return_counts=True)
    values = np.maximum.reduceat(np.concatenate([weights, weights])[order], start) if len(keys) else weights
    keep = values > 0
    if mutual:
        keep &= count == 2  # listed by both ends
    return AffinityGraph(n, keys[keep] // n, keys[keep] % n, values[keep])


def normalised(graph: AffinityGraph) -> AffinityGraph:
    """``D^-1/2 W D^-1/2``; a node without edges has none after."""
    degrees = graph.degrees()
    scale = np.where(degrees > 0, 1.0 / np.sqrt(np.maximum(degrees, 1e-300)), 0.0)
    return replace(graph, values=graph.values * scale[graph.rows] * scale[graph.cols])


def subgraph(graph: AffinityGraph, nodes: np.ndarray) -> AffinityGraph:
    """The graph restricted to ``nodes`` (distinct rows), renumbered ``0 … len(nodes) − 1`` in their order."""
    local = np.full(graph.size, -1, np.int64)
    local[nodes] = np.arange(len(nodes))
    indptr = graph.indptr
    starts, lengths = indptr[nodes], indptr[nodes + 1] - indptr[nodes]
    offsets = np.repeat(starts - np.cumsum(lengths) + lengths, lengths) + np.arange(lengths.sum())
    rows, cols = np.repeat(np.arange(len(nodes)), lengths), local[graph.cols[offsets]]
    inside = cols >= 0
    return AffinityGraph(len(nodes), rows[inside], cols[inside], graph.values[offsets][inside])


def conjugate_gradient(
    matvec: Callable[[np.ndarray], np.ndarray],
    b: np.ndarray,
    x0: np.ndarray | None = None,
    iterations: int = DEFAULT_ITERATIONS,
    tolerance: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
    """``x`` with ``A x ≈ b`` for a symmetric positive-definite ``A`` given as ``matvec``: at most
    ``iterations`` steps from ``x0`` (default 0), stopping once ``‖b − A x‖ ≤ tolerance · ‖b‖``."""
    x = np.zeros(len(b)) if x0 is None else np.array(x0, np.float64)
    r = b - matvec(x)
    p, rr = r.copy(), float(r @ r)
    limit = (tolerance * float(np.linalg.norm(b))) ** 2
    for _ in range(iterations):
        if rr <= limit:
            break
        ap = matvec(p)
        step = rr / float(p @ ap)
        x += step * p
        r -= step * ap
        rr, previous = float(r @ r), rr
        p = r + (rr / previous) * p
    return x


def diffuse(
    graph: AffinityGraph,
    y: np.ndarray,
    alpha: float = DEFAULT_ALPHA,
    iterations: int = DEFAULT_ITERATIONS,
    tolerance: float = DEFAULT_TOLERANCE,
) -> np.ndarray:
    """One query's diffusion: ``f`` with ``(I − α S) f = y``, ``S`` the *normalised* graph, by CG from ``y``."""
    y = np.asarray(y, np.float64)
    return conjugate_gradient(lambda x: x - alpha * graph.dot(x), y, y, iterations, tolerance)


def _row_lookup(ids: np.ndarray) -> Callable[[np.ndarray], np.ndarray]:
    """id → row in ``ids``; ``-1`` stays ``-1``, an id not there is a ConfigError."""
    sorter = np.argsort(ids, kind="stable")

    def rows(wanted: np.ndarray) -> np.ndarray:
        wanted = np.asarray(wanted, np.int64)
        out = np.full(wanted.shape, -1, np.int64)
        found = wanted >= 0
        at = np.minimum(np.searchsorted(ids, wanted[found], sorter=sorter), max(len(ids) - 1, 0))
        if found.any() and (len(ids) == 0 or (ids[sorter[at]] != wanted[found]).any()):
            raise ConfigError("diffusion: the shortlist or the graph names an id the database's graph lacks")
        out[found] = sorter[at]
        return out

    return rows


def _real(value: float) -> bool:
    return not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)


def _count(value: int, low: int, name: str, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high and value > high):
        span = f"from {low} to {high}" if high else f"at least {low}"
        raise ConfigError(f"diffusion needs {name} {span}, got {value!r}")


@register("diffusion", "diffusion on the database's kNN graph, from the query's kq first neighbours")
@dataclass(frozen=True)
class Diffusion:
    """Diffusion as a stage: the graph of ``ranking.database`` (its own if it is a :class:`GraphSource`,
    else a self-search of its vectors, which every call pays: N² · D multiply-adds, shared by the batch),
    then each query diffused on it. The output is as deep as the input: the diffused entries by ``f``
    (equal ``f`` keep the input order; in a full graph, entries not shortlisted follow by row), then any
    shortlisted entries beyond ``truncate`` in input order with score ``-inf``. A query with no
    neighbour of positive similarity keeps its ranking."""

    k: int = DEFAULT_K
    kq: int = DEFAULT_KQ
    gamma: float = DEFAULT_GAMMA
    alpha: float = DEFAULT_ALPHA
    iterations: int = DEFAULT_ITERATIONS
    truncate: int = DEFAULT_TRUNCATE
    mutual: bool = True

    def __post_init__(self) -> None:
        _count(self.k, 1, "k", MAX_K)
        _count(self.kq, 1, "kq", MAX_K)
        _count(self.iterations, 1, "iterations", 10_000)
        _count(self.truncate, 0, "truncate")
        if self.truncate and self.truncate <= self.kq:
            raise ConfigError(f"diffusion needs truncate 0 (no truncation) or above kq, got {self.truncate}")
        if not _real(self.gamma) or self.gamma <= 0:  # γ = 0 would weigh negative similarities 0⁰ = 1
            raise ConfigError(f"diffusion needs a finite gamma > 0, got {self.gamma!r}")
        if not _real(self.alpha) or not 0 <= self.alpha < 1:
            raise ConfigError(f"diffusion needs alpha in [0, 1), got {self.alpha!r}")
        if not isinstance(self.mutual, bool):
            raise ConfigError(f"diffusion: mutual must be true or false, got {self.mutual!r}")

    def depth(self, k: int) -> int:
        return max(k, self.truncate, self.kq + 1)  # kq neighbours even when the query itself is first

    def graph(self, database: Database) -> tuple[np.ndarray, AffinityGraph]:
        """The database's ids and its affinity graph ``W`` (rows in the order of those ids)."""
        if isinstance(database, GraphSource):
            ids, neighbours, similarities = database.knn_graph(self.k)
        else:
            ids, xb = database.vectors()
            ids, neighbours, similarities = knn_graph(xb, self.k, ids)
        ids = np.asarray(ids, np.int64)
        if neighbours.ndim != 2 or neighbours.shape != similarities.shape or len(neighbours) != len(ids):
            raise ConfigError(f"a kNN graph needs (N, k) neighbours and similarities for {len(ids)} ids")
        return ids, affinity_graph(_row_lookup(ids)(neighbours), similarities, self.gamma, self.mutual)

    def rerank(self, ranking: Ranking) -> Ranking:
        if len(ranking.database) == 0 or ranking.depth == 0:
            return ranking
        ids, graph = self.graph(ranking.database)
        rows_of = _row_lookup(ids)
        whole = None if self.truncate else normalised(graph)
        out_ids, out_scores = ranking.ids.copy(), ranking.scores.copy()
        for q in range(len(ranking.queries)):
            valid = ranking.ids[q] >= 0
            listed, similarities = ranking.ids[q][valid], ranking.scores[q][valid].astype(np.float64)
            seeds = np.flatnonzero(listed != ranking.own[q])[: self.kq]  # positions in the shortlist
            weights = np.maximum(similarities[seeds], 0.0) ** self.gamma
            if not (weights > 0).any():
                continue
            rows = rows_of(listed)
            if whole is None:
                nodes = rows[: self.truncate]
                y = np.zeros(len(nodes))
                y[seeds] = weights  # seeds lie in the first kq + 1 < truncate entries
                f = diffuse(normalised(subgraph(graph, nodes)), y, self.alpha, self.iterations)
                order = np.argsort(-f, kind="stable")
                found = np.concatenate([listed[order], listed[len(nodes) :]])
                scores = np.concatenate([f[order], np.full(len(listed) - len(nodes), -np.inf)])
            else:
                y = np.zeros(graph.size)
                y[rows[seeds]] = weights
                f = diffuse(whole, y, self.alpha, self.iterations)
                tie = len(listed) + np.arange(graph.size)  # not shortlisted: by row, after the listed
                tie[rows] = np.arange(len(listed))
                order = np.lexsort((tie, -f))[: ranking.depth]
                found, scores = ids[order], f[order]
            out_ids[q], out_scores[q] = -1, -np.inf
            out_ids[q, : len(found)], out_scores[q, : len(found)] = found, scores
        return replace(ranking, ids=out_ids, scores=out_scores.astype(np.float32))
