"""Re-ranking by descriptor expansion: α-weighted query expansion (αQE) and database-side augmentation
(DBA), as in Radenović, Tolias & Chum (GeM, TPAMI 2018).

Both replace a vector by the L2-normalised sum of itself and its ``n`` nearest database neighbours, each
weighted by its cosine similarity raised to ``alpha`` (negative similarities weigh 0):

    x' = normalise(x + Σ_{i ≤ n} max(s_i, 0)^α · d_i)

αQE does it for each query before the final search; DBA does it once for every database vector (its own
nearest neighbour is itself, which is why the formula counts it once, explicitly). ``alpha = 0`` is plain
average query expansion. Arrays are ``(N, D)`` float32 with unit rows.
"""

from __future__ import annotations

from typing import Final

import numpy as np

from lookalike.errors import ConfigError

RERANKINGS: Final = ("none", "aqe", "dba", "dba+aqe")
DEFAULT_N: Final = 2
DEFAULT_ALPHA: Final = 3.0
_CHUNK = 1024  # query rows per similarity block: bounds memory at _CHUNK × N floats


def _as_matrix(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] == 0:
        raise ConfigError(f"{name} must be an (N, D) array, got shape {x.shape}")
    return x


def _check(n: int, alpha: float, database: np.ndarray) -> None:
    if n < 1:
        raise ConfigError(f"re-ranking needs n ≥ 1 neighbours, got {n}")
    if not np.isfinite(alpha) or alpha < 0:
        raise ConfigError(f"re-ranking needs a finite alpha ≥ 0, got {alpha}")
    if len(database) == 0:
        raise ConfigError("re-ranking needs a non-empty database")


def _normalised(x: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.maximum(norms, 1e-12)).astype(np.float32)


def _top_neighbours(sims: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and similarities ``(Q, n)`` of the ``n`` largest similarities per row, best first."""
    n = min(n, sims.shape[1])
    top = np.argpartition(-sims, n - 1, axis=1)[:, :n]
    values = np.take_along_axis(sims, top, axis=1)
    order = np.argsort(-values, axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1), np.take_along_axis(values, order, axis=1)


def expand_with(
    vectors: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """``vectors`` (Q, D) plus their given ``neighbours`` (Q, n, D) weighted by ``similarities`` (Q, n)
    to the power α, then L2 (a non-finite similarity marks a missing neighbour and weighs 0)."""
    weights = np.maximum(similarities, 0.0) ** alpha
    weights[~np.isfinite(similarities)] = 0.0
    return _normalised(vectors + np.einsum("qn,qnd->qd", weights, neighbours))


def alpha_query_expansion(
    queries: np.ndarray,
    database: np.ndarray,
    n: int = DEFAULT_N,
    alpha: float = DEFAULT_ALPHA,
    exclude: np.ndarray | None = None,
) -> np.ndarray:
    """αQE: each query ``(Q, D)`` plus its ``n`` nearest ``database`` rows weighted by similarity^α, then L2.

    ``exclude`` (one database index per query, −1 for none) keeps a query from expanding with that
    database entry — a query that is itself in the database must not count itself among its neighbours.
    """
    queries, database = _as_matrix(queries, "queries"), _as_matrix(database, "database")
    _check(n, alpha, database)
    if queries.shape[1] != database.shape[1]:
        raise ConfigError(f"queries have dimension {queries.shape[1]}, the database {database.shape[1]}")
    out = np.empty_like(queries)
    for start in range(0, len(queries), _CHUNK):
        block = queries[start : start + _CHUNK]
        sims = block @ database.T
        if exclude is not None:
            rows = np.flatnonzero(exclude[start : start + _CHUNK] >= 0)
            sims[rows, exclude[start : start + _CHUNK][rows]] = -np.inf
        ids, values = _top_neighbours(sims, n)
        out[start : start + _CHUNK] = expand_with(block, database[ids], values, alpha)
    return out


def database_side_augmentation(
    database: np.ndarray, n: int = DEFAULT_N, alpha: float = DEFAULT_ALPHA
) -> np.ndarray:
    """DBA: every database vector expanded with its ``n`` nearest *other* database vectors."""
    return alpha_query_expansion(database, database, n, alpha, exclude=np.arange(len(database)))


def rerank_vectors(
    queries: np.ndarray,
    database: np.ndarray,
    method: str,
    n: int = DEFAULT_N,
    alpha: float = DEFAULT_ALPHA,
    query_ids: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """``(queries, database)`` after ``method`` ∈ :data:`RERANKINGS`; searching the returned arrays by
    inner product gives the re-ranked lists. ``query_ids`` are the queries' own database rows, if any."""
    if method not in RERANKINGS:
        raise ConfigError(f"unknown re-ranking {method!r}; expected one of {', '.join(RERANKINGS)}")
    if "dba" in method:
        database = database_side_augmentation(database, n, alpha)
    if "aqe" in method:
        queries = alpha_query_expansion(queries, database, n, alpha, query_ids)
    return queries, database


__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_N",
    "RERANKINGS",
    "alpha_query_expansion",
    "database_side_augmentation",
    "expand_with",
    "rerank_vectors",
]
