"""Diffusion: the CG solver against a direct solve, the graph and the whole stage against a dense loop-built
reference (full graph and truncated), the manifold effect plain cosine misses, and the stage in chains."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.rerank import (
    ArrayDatabase,
    Diffusion,
    GraphSource,
    Ranking,
    affinity_graph,
    conjugate_gradient,
    diffusion,
    knn_graph,
    parse_chain,
)
from tests.conftest import unit_rows

DATABASE = unit_rows(60, 8, seed=11)
QUERIES = unit_rows(4, 8, seed=12)
IDS = np.arange(60, dtype=np.int64) * 5 + 2  # ids are not rows
EXACT = "iterations=500"  # enough CG steps on 60 nodes to match a direct solve


# -- naive references ------------------------------------------------------------------------------------


def naive_knn(database: np.ndarray, k: int) -> list[list[int]]:
    sims = database.astype(np.float64) @ database.T.astype(np.float64)
    return [
        sorted((j for j in range(len(database)) if j != i), key=lambda j: (-sims[i, j], j))[:k]
        for i in range(len(database))
    ]


def naive_w(database: np.ndarray, k: int, gamma: float, mutual: bool) -> np.ndarray:
    sims = database.astype(np.float64) @ database.T.astype(np.float64)
    knn = naive_knn(database, k)
    w = np.zeros((len(database), len(database)))
    for i in range(len(database)):
        for j in knn[i]:
            if mutual and i not in knn[j]:
                continue
            w[i, j] = w[j, i] = max(sims[i, j], 0.0) ** gamma
    return w


def naive_diffusion(
    query: np.ndarray,
    database: np.ndarray,
    *,
    own: int = -1,
    k: int = 50,
    kq: int = diffusion.DEFAULT_KQ,
    gamma: float = 3.0,
    alpha: float = diffusion.DEFAULT_ALPHA,
    truncate: int = 1000,
    mutual: bool = True,
) -> dict[int, float]:
    """Row → f for every diffused row: dense W by loops, the sub-graph (or all), D^-1/2 W D^-1/2 by
    loops, (I − αS) f = y by a direct solve."""
    w = naive_w(database, k, gamma, mutual)
    sims = [float(query.astype(np.float64) @ d) for d in database]
    shortlist = sorted(range(len(database)), key=lambda j: (-sims[j], j))
    nodes = shortlist[:truncate] if truncate else list(range(len(database)))
    seeds = [j for j in shortlist if j != own][:kq]
    m = len(nodes)
    degree = [sum(w[nodes[a], nodes[b]] for b in range(m)) for a in range(m)]
    s = np.zeros((m, m))
    for a in range(m):
        for b in range(m):
            if degree[a] > 0 and degree[b] > 0:
                s[a, b] = w[nodes[a], nodes[b]] / math.sqrt(degree[a] * degree[b])
    y = np.array([max(sims[j], 0.0) ** gamma if j in seeds else 0.0 for j in nodes])
    f = np.linalg.solve(np.eye(m) - alpha * s, y)
    return dict(zip(nodes, f, strict=True))


def assert_ranks_by(ranking: Ranking, row: int, f: dict[int, float], ids: np.ndarray) -> None:
    """The ranking's row is ``f`` sorted best first (any order among equal values), with f as scores."""
    rows = {int(i): r for r, i in enumerate(ids)}
    got = [rows[int(i)] for i in ranking.ids[row] if i >= 0][: len(f)]
    expected = sorted(f.values(), reverse=True)[: len(got)]
    np.testing.assert_allclose(ranking.scores[row, : len(got)], expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose([f[r] for r in got], expected, rtol=1e-4, atol=1e-7)


# -- the maths -------------------------------------------------------------------------------------------


def test_conjugate_gradient_equals_a_direct_solve() -> None:
    rng = np.random.default_rng(0)
    m = rng.standard_normal((30, 30))
    a = m @ m.T + 0.5 * np.eye(30)  # symmetric positive definite
    b = rng.standard_normal(30)
    x = conjugate_gradient(lambda v: a @ v, b, iterations=200, tolerance=1e-12)
    np.testing.assert_allclose(x, np.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
    warm = conjugate_gradient(lambda v: a @ v, b, x0=b, iterations=200, tolerance=1e-12)
    np.testing.assert_allclose(warm, np.linalg.solve(a, b), rtol=1e-6, atol=1e-8)
    np.testing.assert_array_equal(conjugate_gradient(lambda v: a @ v, b, x0=b, iterations=0), b)
    assert not np.allclose(conjugate_gradient(lambda v: a @ v, b, iterations=2), np.linalg.solve(a, b))


def test_knn_graph_skips_each_vector_itself_and_pads() -> None:
    ids, neighbours, sims = knn_graph(DATABASE, 6, IDS)
    np.testing.assert_array_equal(ids, IDS)
    assert neighbours.shape == sims.shape == (60, 6) and neighbours.dtype == np.int64
    assert [[int(IDS[j]) for j in row] for row in naive_knn(DATABASE, 6)] == neighbours.tolist()
    np.testing.assert_allclose(
        sims, np.take_along_axis(DATABASE @ DATABASE.T, (neighbours - 2) // 5, 1), atol=1e-6
    )
    _, few, few_sims = knn_graph(DATABASE[:3], 4)
    assert few.tolist() == [[*row, -1, -1] for row in naive_knn(DATABASE[:3], 4)]
    assert np.isneginf(few_sims[:, 2:]).all()


@pytest.mark.parametrize("mutual", [True, False])
def test_affinity_graph_equals_the_loop(mutual: bool) -> None:
    _, neighbours, sims = knn_graph(DATABASE, 7)
    w = affinity_graph(neighbours, sims, 3.0, mutual)
    np.testing.assert_allclose(w.dense(), naive_w(DATABASE, 7, 3.0, mutual), atol=1e-6)
    assert (np.diff(w.rows) >= 0).all()


# -- the stage against the dense reference ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "kwargs"),
    [
        ("k=8,kq=5,truncate=0", {"k": 8, "kq": 5, "truncate": 0}),
        ("k=8,kq=5,truncate=25", {"k": 8, "kq": 5, "truncate": 25}),
        (
            "k=5,kq=3,gamma=1.0,alpha=0.8,truncate=40",
            {"k": 5, "kq": 3, "gamma": 1.0, "alpha": 0.8, "truncate": 40},
        ),
        ("k=6,kq=4,truncate=0,mutual=false", {"k": 6, "kq": 4, "truncate": 0, "mutual": False}),
        ("k=6,kq=4,truncate=30,mutual=false", {"k": 6, "kq": 4, "truncate": 30, "mutual": False}),
    ],
)
def test_diffusion_equals_the_dense_reference(options: str, kwargs: dict) -> None:
    chain = parse_chain(f"diffusion:{options},{EXACT}")
    ranking = chain.search(ArrayDatabase(DATABASE, IDS), QUERIES, 60)
    assert ranking.ids.shape == (4, 60)
    for q, query in enumerate(QUERIES):
        assert_ranks_by(ranking, q, naive_diffusion(query, DATABASE, **kwargs), IDS)
    truncate = kwargs["truncate"]
    if truncate:  # shortlisted entries beyond the sub-graph follow in input order
        plain = ArrayDatabase(DATABASE, IDS).search(QUERIES, 60)
        np.testing.assert_array_equal(ranking.ids[:, truncate:], plain[1][:, truncate:])
        assert np.isneginf(ranking.scores[:, truncate:]).all()


def test_default_iterations_come_close_to_the_solve() -> None:
    ranking = parse_chain("diffusion:k=8,kq=5,truncate=0").search(ArrayDatabase(DATABASE), QUERIES, 5)
    for q, query in enumerate(QUERIES):
        f = naive_diffusion(query, DATABASE, k=8, kq=5, truncate=0)
        best = sorted(f, key=lambda r: -f[r])[:5]
        assert len(set(ranking.ids[q]) & set(best)) >= 4


def test_a_query_in_the_database_never_seeds_itself() -> None:
    own_rows = np.array([7, -1, 30])
    queries = np.where((own_rows >= 0)[:, None], DATABASE[own_rows], QUERIES[:3])
    own = np.where(own_rows >= 0, IDS[own_rows], -1)
    database = ArrayDatabase(DATABASE, IDS)
    for options, kwargs in (("truncate=0", {"truncate": 0}), ("truncate=30", {"truncate": 30})):
        chain = parse_chain(f"diffusion:k=8,kq=4,{options},{EXACT}")
        ranking = chain.search(database, queries, 20, own)
        counted = chain.search(database, queries, 20)  # the same queries, not known to be entries
        for q, row in enumerate(own_rows):
            assert_ranks_by(
                ranking, q, naive_diffusion(queries[q], DATABASE, own=row, k=8, kq=4, **kwargs), IDS
            )
        assert not np.allclose(ranking.scores[0], counted.scores[0])


def test_diffusion_follows_the_manifold_that_cosine_misses() -> None:
    """Two parallel arcs on the sphere: the far end of the query's arc is less similar to the query than
    the start of the other arc, yet diffusion ranks every point of its own arc first."""
    t = np.linspace(0.0, 1.5, 31)
    arc = np.stack([np.cos(t), np.sin(t), np.full_like(t, 0.3)], axis=1)
    database = np.vstack([arc, arc * [1, 1, -1]]).astype(np.float32)  # rows 0-30 and 31-61
    database /= np.linalg.norm(database, axis=1, keepdims=True)
    query = database[:1]
    far_end, other_start = 30, 31
    cosine = ArrayDatabase(database).search(query, 62)[1][0].tolist()
    assert cosine.index(other_start) < cosine.index(far_end)
    for options in ("k=5,kq=3", "k=5,kq=3,truncate=0"):
        ranking = parse_chain(f"diffusion:{options}").search(
            ArrayDatabase(database), query, 62, own=np.array([0])
        )
        ranked = ranking.ids[0].tolist()
        assert ranked.index(far_end) < ranked.index(other_start)
        assert set(ranked[:31]) == set(range(31))
        # the other arc is not reached (f = 0): it keeps the input order, below
        assert ranked[31:] == [row for row in cosine if row > far_end]
        assert (ranking.scores[0, 31:] == 0).all() and (ranking.scores[0, :31] > 0).all()


# -- options, chains and databases -----------------------------------------------------------------------


def test_diffusion_parses_and_reads_back() -> None:
    chain = parse_chain("diffusion:k=10,alpha=0.5")
    assert chain.stages == (Diffusion(k=10, alpha=0.5),)
    assert str(chain) == "diffusion:k=10,alpha=0.5"
    assert parse_chain(str(chain)) == chain
    assert (
        Diffusion().depth(5) == 1000
        and Diffusion(truncate=0).depth(5) == 5
        and Diffusion(truncate=0, kq=10).depth(5) == 11
    )
    assert parse_chain("diffusion:mutual=no").stages == (Diffusion(mutual=False),)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("diffusion:k=0", "diffusion needs k from 1 to 1000"),
        ("diffusion:kq=0", "diffusion needs kq from 1 to 1000"),
        ("diffusion:k=1.5", "diffusion: k must be an integer"),
        ("diffusion:gamma=-1", "diffusion needs a finite gamma > 0"),
        ("diffusion:gamma=0", "diffusion needs a finite gamma > 0"),
        ("diffusion:alpha=1", r"diffusion needs alpha in \[0, 1\)"),
        ("diffusion:alpha=-0.1", r"diffusion needs alpha in \[0, 1\)"),
        ("diffusion:iterations=0", "diffusion needs iterations from 1"),
        ("diffusion:truncate=-1", "diffusion needs truncate at least 0"),
        ("diffusion:truncate=3", "truncate 0 .* or above kq"),
        ("diffusion:mutual=maybe", "mutual must be true or false"),
        ("diffusion:beta=1", "diffusion has no option 'beta'"),
    ],
)
def test_bad_options_are_config_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_chain(text)


def test_bad_values_given_directly_are_config_errors() -> None:
    for options in ({"k": True}, {"alpha": float("nan")}, {"gamma": float("inf")}, {"mutual": 1}):
        with pytest.raises(ConfigError):
            Diffusion(**options)  # type: ignore[arg-type]


def test_diffusion_after_aqe_uses_the_expanded_shortlist() -> None:
    ranking = parse_chain(f"aqe,diffusion:k=8,kq=5,truncate=30,{EXACT}").search(
        ArrayDatabase(DATABASE, IDS), QUERIES, 10
    )
    assert not np.allclose(ranking.queries, QUERIES)
    for q, query in enumerate(ranking.queries):
        assert_ranks_by(ranking, q, naive_diffusion(query, DATABASE, k=8, kq=5, truncate=30), IDS)


def test_a_query_without_neighbours_keeps_its_ranking() -> None:
    database = ArrayDatabase(DATABASE, IDS)
    scores = np.array([[-np.inf] * 3, [0.9, -np.inf, -np.inf], [-0.2, -0.5, -0.7]], np.float32)
    ids = np.array([[-1, -1, -1], [IDS[4], -1, -1], IDS[[1, 2, 3]]])
    ranking = Ranking(QUERIES[:3], scores, ids, database, own=np.array([-1, IDS[4], -1]))
    for stage in (Diffusion(k=5, kq=2, truncate=3), Diffusion(k=5, kq=2, truncate=0)):
        out = stage.rerank(ranking)
        np.testing.assert_array_equal(out.ids, ids)
        np.testing.assert_array_equal(out.scores, scores)


def test_a_database_smaller_than_k() -> None:
    small = ArrayDatabase(DATABASE[:5], IDS[:5])
    for options, kwargs in ((":truncate=0", {"truncate": 0}), ("", {})):
        ranking = parse_chain(f"diffusion{options}").search(small, QUERIES, 10)
        assert ranking.ids.shape == (4, 5)
        for q, query in enumerate(QUERIES):
            assert sorted(ranking.ids[q]) == list(IDS[:5])
            assert_ranks_by(ranking, q, naive_diffusion(query, DATABASE[:5], **kwargs), IDS)


class GraphDatabase(ArrayDatabase):
    """A database that keeps its own graph: diffusion must ask it, not rebuild from the vectors."""

    def __init__(self, xb: np.ndarray, ids: np.ndarray) -> None:
        super().__init__(xb, ids)
        self.asked: list[int] = []

    def knn_graph(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        self.asked.append(k)
        return knn_graph(self.xb, k, self.ids)

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        raise AssertionError("the graph should come from knn_graph")


def test_a_graph_source_is_asked_for_its_graph() -> None:
    database = GraphDatabase(DATABASE, IDS)
    assert isinstance(database, GraphSource) and not isinstance(ArrayDatabase(DATABASE), GraphSource)
    ranking = parse_chain(f"diffusion:k=8,kq=5,truncate=0,{EXACT}").search(database, QUERIES, 60)
    assert database.asked == [8]  # once for the whole batch
    for q, query in enumerate(QUERIES):
        assert_ranks_by(ranking, q, naive_diffusion(query, DATABASE, k=8, kq=5, truncate=0), IDS)
