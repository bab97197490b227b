"""What every re-ranker reads and returns: a :class:`Ranking` against a :class:`Database`.

Arrays follow faiss: queries ``xq`` (Q, D) float32 with unit rows; a shortlist is ``scores`` (Q, K) float32,
best first, and ``ids`` (Q, K) int64 database ids, ``-1`` where the database has fewer than K entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from lookalike.errors import ConfigError

if TYPE_CHECKING:
    from PIL import Image

    from lookalike.local.features import LocalDescriber, LocalFeatures

_CHUNK = 1024  # query rows per similarity block: bounds memory at _CHUNK × N floats


@runtime_checkable
class Database(Protocol):
    """The database a ranking refers to, as a re-ranker may ask it. A collection's faiss index is one
    (``collection.query.IndexedVectors``), a plain array another (:class:`ArrayDatabase`); a stage may hand
    the next one a transformed database (DBA does)."""

    @property
    def dim(self) -> int: ...

    def __len__(self) -> int: ...

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` (scores, ids) per query by inner product, best first; at most ``len(self)`` columns."""
        ...

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        """The vectors ``(*ids.shape, D)`` of these ids; an id of ``-1`` gives a row of zeros."""
        ...

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """Every entry: ids ``(N,)`` and vectors ``(N, D)``. Costs N × D floats of memory."""
        ...


@runtime_checkable
class LocalFeatureSource(Protocol):
    """What spatial verification asks of the database: the local features of entries, stored or computed
    now by ``describer`` (None for an entry whose image cannot be read)."""

    def local_features(self, ids: Sequence[int], describer: LocalDescriber) -> list[LocalFeatures | None]: ...


class Reranker(Protocol):
    """One stage of a chain: takes a ranking, returns a better one. Stages are frozen dataclasses whose
    fields are their options (see :func:`lookalike.rerank.register`)."""

    def depth(self, k: int) -> int:
        """How long a shortlist this stage needs to be handed for the best ``k`` to come out right."""
        ...

    def rerank(self, ranking: Ranking) -> Ranking: ...


@dataclass(frozen=True)
class Ranking:
    """Queries, their shortlist, and the database the shortlist's ids and scores refer to.

    ``queries`` are the query vectors as the stages so far left them (αQE replaces them by their
    expansion); ``own`` is each query's own database id (``-1``: the query is not in the database), which
    no stage may count as a neighbour of that query. ``pixels`` holds each query's image when there is
    one (spatial verification needs it; empty when no query has one), and ``local`` the source of the
    database's local features — the first database's, kept when a stage hands on a transformed one.
    """

    queries: np.ndarray
    scores: np.ndarray
    ids: np.ndarray
    database: Database
    own: np.ndarray = field(default_factory=lambda: np.empty(0, np.int64))
    pixels: Sequence[Image.Image | None] = ()
    local: LocalFeatureSource | None = None

    def __post_init__(self) -> None:
        if self.own.size == 0 and len(self.queries):
            object.__setattr__(self, "own", np.full(len(self.queries), -1, np.int64))
        if not (len(self.queries) == len(self.scores) == len(self.ids) == len(self.own)):
            raise ConfigError("a ranking needs one shortlist row and one own id per query")
        if self.scores.shape != self.ids.shape:
            raise ConfigError(f"shortlist scores {self.scores.shape} and ids {self.ids.shape} differ")
        if self.pixels and len(self.pixels) != len(self.queries):
            raise ConfigError(f"{len(self.queries)} queries need as many images, got {len(self.pixels)}")
        if self.local is None and isinstance(self.database, LocalFeatureSource):
            object.__setattr__(self, "local", self.database)

    @property
    def depth(self) -> int:
        return self.ids.shape[1]

    def searched(self, queries: np.ndarray, database: Database | None = None) -> Ranking:
        """``queries`` searched afresh, as deep as this ranking, in ``database`` (default: the same one)."""
        database = self.database if database is None else database
        scores, ids = database.search(queries, self.depth)
        return replace(self, queries=queries, scores=scores, ids=ids, database=database)

    def top(self, k: int) -> Ranking:
        return replace(self, scores=self.scores[:, :k], ids=self.ids[:, :k])

    def neighbours(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Each query's first ``n`` shortlisted neighbours other than itself: ids ``(Q, n)`` (``-1`` where
        there are fewer) and their scores (``-inf`` there)."""
        usable = (self.ids >= 0) & (self.ids != self.own[:, None])
        order = np.argsort(~usable, axis=1, kind="stable")[:, :n]  # usable positions first, in rank order
        kept = np.take_along_axis(usable, order, axis=1)
        ids = np.where(kept, np.take_along_axis(self.ids, order, axis=1), -1)
        scores = np.where(kept, np.take_along_axis(self.scores, order, axis=1), -np.inf)
        return ids.astype(np.int64), scores.astype(np.float32)


def as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ConfigError(f"{name} must be an (N, D) array, got shape {x.shape}")
    return x


def exact_search(xq: np.ndarray, xb: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, rows) of ``xq`` against ``xb`` by inner product; equal scores keep the lower row
    first (as :func:`lookalike.evaluate.metrics.rank_by_similarity`)."""
    k = min(k, len(xb))
    scores = np.empty((len(xq), k), np.float32)
    rows = np.empty((len(xq), k), np.int64)
    for start in range(0, len(xq), _CHUNK):
        sims = xq[start : start + _CHUNK] @ xb.T
        order = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        rows[start : start + _CHUNK] = order
        scores[start : start + _CHUNK] = np.take_along_axis(sims, order, axis=1)
    return scores, rows


class ArrayDatabase:
    """A :class:`Database` held in memory: vectors ``xb`` (N, D) with ids (default: their rows), searched
    exactly. Evaluation ranks against one; DBA hands one (the augmented vectors) to the next stage."""

    def __init__(self, xb: np.ndarray, ids: np.ndarray | None = None) -> None:
        self.xb = as_matrix(xb, "database")
        self.ids = np.arange(len(self.xb), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
        if self.ids.shape != (len(self.xb),):
            raise ConfigError(f"{len(self.xb)} database vectors need as many ids, got {self.ids.shape}")
        self._sorted = np.argsort(self.ids, kind="stable")
        if len(self.ids) and (np.diff(self.ids[self._sorted]) == 0).any():
            raise ConfigError("database ids must be distinct")

    @property
    def dim(self) -> int:
        return self.xb.shape[1]

    def __len__(self) -> int:
        return len(self.xb)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        xq = as_matrix(xq, "queries")
        if xq.shape[1] != self.dim:
            raise ConfigError(f"queries have dimension {xq.shape[1]}, the database {self.dim}")
        scores, rows = exact_search(xq, self.xb, k)
        return scores, self.ids[rows]

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        found = ids >= 0
        wanted = ids[found]
        rows = np.zeros(0, np.int64)
        if wanted.size:
            at = np.searchsorted(self.ids, wanted, sorter=self._sorted) if len(self.ids) else None
            if at is None or (at >= len(self.ids)).any() or (self.ids[self._sorted[at]] != wanted).any():
                raise ConfigError("asked for the vector of an id the database does not hold")
            rows = self._sorted[at]
        out = np.zeros((*ids.shape, self.dim), np.float32)
        out[found] = self.xb[rows]
        return out

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ids, self.xb
