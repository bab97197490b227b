"""αQE and DBA against slow per-row loops, a hand-computed case, and the evaluation wiring."""

from __future__ import annotations

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.rerank import (
    alpha_query_expansion,
    database_side_augmentation,
    rerank_vectors,
)
from tests.conftest import unit_rows


def naive_expand(x: np.ndarray, database: np.ndarray, n: int, alpha: float, skip: int = -1) -> np.ndarray:
    sims = [(float(x @ d), i) for i, d in enumerate(database) if i != skip]
    sims.sort(key=lambda pair: -pair[0])
    total = x.astype(np.float64).copy()
    for s, i in sims[:n]:
        total += max(s, 0.0) ** alpha * database[i]
    return total / np.linalg.norm(total)


@pytest.mark.parametrize(("n", "alpha"), [(1, 3.0), (2, 3.0), (5, 1.0), (3, 0.0)])
def test_query_expansion_equals_the_loop(n: int, alpha: float) -> None:
    queries, database = unit_rows(7, 16, seed=1), unit_rows(40, 16, seed=2)
    ours = alpha_query_expansion(queries, database, n, alpha)
    naive = np.stack([naive_expand(q, database, n, alpha) for q in queries])
    np.testing.assert_allclose(ours, naive, atol=1e-5)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("n", [1, 3])
def test_database_side_augmentation_skips_each_vector_itself(n: int) -> None:
    database = unit_rows(30, 8, seed=3)
    ours = database_side_augmentation(database, n, 3.0)
    naive = np.stack([naive_expand(d, database, n, 3.0, skip=i) for i, d in enumerate(database)])
    np.testing.assert_allclose(ours, naive, atol=1e-5)


def test_hand_computed_expansion() -> None:
    database = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    query = np.array([[0.6, 0.8]], dtype=np.float32)
    # neighbours: [0,1] (s=0.8, w=0.64) and [1,0] (s=0.6, w=0.36); x' ∝ (0.6+0.36, 0.8+0.64)
    expected = np.array([0.96, 1.44]) / np.hypot(0.96, 1.44)
    np.testing.assert_allclose(alpha_query_expansion(query, database, 2, 2.0)[0], expected, atol=1e-6)
    # a negative similarity weighs nothing, even when asked for every neighbour
    np.testing.assert_allclose(alpha_query_expansion(query, database, 3, 2.0)[0], expected, atol=1e-6)


def test_exclusion_of_a_query_that_is_in_the_database() -> None:
    database = unit_rows(20, 8, seed=4)
    queries = database[[3, 7]]
    ours = alpha_query_expansion(queries, database, 2, 3.0, exclude=np.array([3, -1]))
    np.testing.assert_allclose(ours[0], naive_expand(database[3], database, 2, 3.0, skip=3), atol=1e-5)
    np.testing.assert_allclose(ours[1], naive_expand(database[7], database, 2, 3.0), atol=1e-5)


def test_rerank_vectors_combines_dba_then_aqe() -> None:
    queries, database = unit_rows(5, 12, seed=5), unit_rows(25, 12, seed=6)
    q, d = rerank_vectors(queries, database, "none")
    assert q is queries and d is database
    q, d = rerank_vectors(queries, database, "dba+aqe", n=2, alpha=3.0)
    augmented = database_side_augmentation(database, 2, 3.0)
    np.testing.assert_allclose(d, augmented, atol=1e-6)
    np.testing.assert_allclose(q, alpha_query_expansion(queries, augmented, 2, 3.0), atol=1e-6)


def test_expansion_pulls_a_query_towards_its_group() -> None:
    """A noisy query of a tight group: after αQE it is closer to the group's centre than before."""
    rng = np.random.default_rng(0)
    centre = unit_rows(1, 32, seed=7)[0]
    group = centre + 0.2 * rng.standard_normal((5, 32))
    group /= np.linalg.norm(group, axis=1, keepdims=True)
    database = np.vstack([group, unit_rows(50, 32, seed=8)]).astype(np.float32)
    query = centre + 0.6 * rng.standard_normal(32)
    query = (query / np.linalg.norm(query)).astype(np.float32)[None]
    expanded = alpha_query_expansion(query, database, 3, 3.0)
    assert float(expanded[0] @ centre) > float(query[0] @ centre)


def test_bad_options_are_config_errors() -> None:
    database = unit_rows(4, 4)
    for kwargs in ({"n": 0}, {"alpha": -1.0}, {"alpha": float("nan")}):
        with pytest.raises(ConfigError):
            alpha_query_expansion(database, database, **kwargs)
    with pytest.raises(ConfigError, match="unknown re-ranking"):
        rerank_vectors(database, database, "diffusion")
    with pytest.raises(ConfigError, match="dimension"):
        alpha_query_expansion(unit_rows(2, 3), database)
    with pytest.raises(ConfigError):
        database_side_augmentation(np.zeros((0, 4), np.float32))
