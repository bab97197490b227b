"""Re-ranking: αQE and DBA maths and stages against slow per-row loops and a hand-computed case; chains
parsed from text (good and bad); the registry as the seam a new stage plugs into; evaluation's wiring."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.evaluate.metrics import rank_by_similarity
from lookalike.evaluate.run import Variant, ranked
from lookalike.rerank import (
    AlphaQueryExpansion,
    ArrayDatabase,
    Chain,
    DatabaseSideAugmentation,
    Ranking,
    alpha_query_expansion,
    database_side_augmentation,
    parse_chain,
    register,
    registry_help,
    reranker_names,
)
from lookalike.rerank import registry as registry_module
from tests.conftest import unit_rows

# -- naive references ------------------------------------------------------------------------------------


def naive_expand(x: np.ndarray, database: np.ndarray, n: int, alpha: float, skip: int = -1) -> np.ndarray:
    sims = [(float(x @ d), i) for i, d in enumerate(database) if i != skip]
    sims.sort(key=lambda pair: -pair[0])
    total = x.astype(np.float64).copy()
    for s, i in sims[:n]:
        total += max(s, 0.0) ** alpha * database[i]
    return total / np.linalg.norm(total)


def naive_dba(database: np.ndarray, n: int, alpha: float) -> np.ndarray:
    return np.stack([naive_expand(d, database, n, alpha, skip=i) for i, d in enumerate(database)])


def naive_top(query: np.ndarray, database: np.ndarray, k: int) -> tuple[list[float], list[int]]:
    """Every row scored one at a time, sorted by score then row."""
    scored = sorted(((-float(query @ d), i) for i, d in enumerate(database)))[:k]
    return [-s for s, _ in scored], [i for _, i in scored]


def assert_same_top(ranking: Ranking, expected: list[tuple[list[float], list[int]]], ids: np.ndarray) -> None:
    for row, (scores, rows) in enumerate(expected):
        assert list(ranking.ids[row]) == [int(ids[r]) for r in rows]
        np.testing.assert_allclose(ranking.scores[row], scores, atol=1e-5)


QUERIES, DATABASE = unit_rows(6, 16, seed=1), unit_rows(40, 16, seed=2)
IDS = np.arange(40, dtype=np.int64) * 7 + 3  # ids are not rows: a collection's image ids
OWN_ROWS = np.array([5, -1, 17, -1, 0, 39])


def own_case() -> tuple[np.ndarray, np.ndarray]:
    """Queries of which some are database entries (rows OWN_ROWS), and their own ids."""
    queries = QUERIES.copy()
    for q, row in enumerate(OWN_ROWS):
        if row >= 0:
            queries[q] = DATABASE[row]
    return queries, np.where(OWN_ROWS >= 0, IDS[OWN_ROWS], -1)


# -- the maths -------------------------------------------------------------------------------------------


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
    np.testing.assert_allclose(
        database_side_augmentation(database, n, 3.0), naive_dba(database, n, 3.0), atol=1e-5
    )


def test_hand_computed_expansion() -> None:
    database = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    query = np.array([[0.6, 0.8]], dtype=np.float32)
    # neighbours: [0,1] (s=0.8, w=0.64) and [1,0] (s=0.6, w=0.36); x' ∝ (0.6+0.36, 0.8+0.64)
    expected = np.array([0.96, 1.44]) / np.hypot(0.96, 1.44)
    np.testing.assert_allclose(alpha_query_expansion(query, database, 2, 2.0)[0], expected, atol=1e-6)
    # a negative similarity weighs nothing, even when asked for every neighbour
    np.testing.assert_allclose(alpha_query_expansion(query, database, 3, 2.0)[0], expected, atol=1e-6)
    # the same through the stage: the shortlist gives the neighbours, then the expanded query is searched
    ranking = parse_chain("aqe:alpha=2").search(ArrayDatabase(database), query, k=3)
    np.testing.assert_allclose(ranking.queries[0], expected, atol=1e-6)
    assert list(ranking.ids[0]) == [1, 0, 2]


def test_exclusion_of_a_query_that_is_in_the_database() -> None:
    database = unit_rows(20, 8, seed=4)
    queries = database[[3, 7]]
    ours = alpha_query_expansion(queries, database, 2, 3.0, exclude=np.array([3, -1]))
    np.testing.assert_allclose(ours[0], naive_expand(database[3], database, 2, 3.0, skip=3), atol=1e-5)
    np.testing.assert_allclose(ours[1], naive_expand(database[7], database, 2, 3.0), atol=1e-5)


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
    with pytest.raises(ConfigError, match="dimension"):
        alpha_query_expansion(unit_rows(2, 3), database)
    with pytest.raises(ConfigError):
        database_side_augmentation(np.zeros((0, 4), np.float32))
    for options in ({"n": 0}, {"n": 2.0}, {"n": True}, {"alpha": float("inf")}, {"alpha": -0.5}):
        with pytest.raises(ConfigError):
            AlphaQueryExpansion(**options)
        with pytest.raises(ConfigError):
            DatabaseSideAugmentation(**options)


# -- the database and the ranking ------------------------------------------------------------------------


def test_array_database_search_equals_sorting_by_hand_ties_to_the_lower_row() -> None:
    database = np.vstack([DATABASE, DATABASE[[4, 9]]])  # rows 40, 41 tie with rows 4, 9
    ids = np.arange(len(database), dtype=np.int64)[::-1].copy()
    scores, found = ArrayDatabase(database, ids).search(QUERIES, 12)
    for row, query in enumerate(QUERIES):
        naive_scores, rows = naive_top(query, database, 12)
        assert list(found[row]) == [int(ids[r]) for r in rows]
        np.testing.assert_allclose(scores[row], naive_scores, atol=1e-6)
    assert ArrayDatabase(database).search(QUERIES, 100)[1].shape == (6, 42)  # at most N columns


def test_array_database_vectors_of_ids() -> None:
    database = ArrayDatabase(DATABASE, IDS)
    np.testing.assert_array_equal(database.vectors_of(IDS[[3, 0]]), DATABASE[[3, 0]])
    block = database.vectors_of(np.array([[IDS[1], -1], [-1, IDS[39]]]))
    assert block.shape == (2, 2, 16)
    np.testing.assert_array_equal(block[0, 1], 0)
    np.testing.assert_array_equal(block[1, 1], DATABASE[39])
    with pytest.raises(ConfigError, match="does not hold"):
        database.vectors_of(np.array([4]))
    with pytest.raises(ConfigError, match="distinct"):
        ArrayDatabase(DATABASE[:2], np.array([1, 1]))


def test_neighbours_skip_the_query_itself_and_missing_entries() -> None:
    ranking = Ranking(
        queries=QUERIES[:2],
        scores=np.array([[0.9, 0.8, 0.7, 0.6], [0.5, 0.4, -np.inf, -np.inf]], np.float32),
        ids=np.array([[10, 20, 30, 40], [20, 10, -1, -1]]),
        database=ArrayDatabase(DATABASE),
        own=np.array([20, -1]),
    )
    ids, scores = ranking.neighbours(3)
    np.testing.assert_array_equal(ids, [[10, 30, 40], [20, 10, -1]])
    np.testing.assert_allclose(scores, [[0.9, 0.7, 0.6], [0.5, 0.4, -np.inf]])


# -- each stage against its loop -------------------------------------------------------------------------


@pytest.mark.parametrize(("n", "alpha", "k"), [(2, 3.0, 5), (1, 3.0, 1), (4, 1.0, 40), (3, 0.0, 7)])
def test_aqe_stage_equals_the_loop(n: int, alpha: float, k: int) -> None:
    queries, own = own_case()
    ranking = parse_chain(f"aqe:n={n},alpha={alpha}").search(ArrayDatabase(DATABASE, IDS), queries, k, own)
    expanded = [naive_expand(q, DATABASE, n, alpha, skip=r) for q, r in zip(queries, OWN_ROWS, strict=True)]
    np.testing.assert_allclose(ranking.queries, np.stack(expanded), atol=1e-5)
    assert_same_top(ranking, [naive_top(q, DATABASE, k) for q in expanded], IDS)


@pytest.mark.parametrize(("n", "k"), [(1, 3), (2, 10), (3, 40)])
def test_dba_stage_equals_the_loop(n: int, k: int) -> None:
    queries, own = own_case()
    ranking = parse_chain(f"dba:n={n}").search(ArrayDatabase(DATABASE, IDS), queries, k, own)
    augmented = naive_dba(DATABASE, n, 3.0)
    assert_same_top(ranking, [naive_top(q, augmented, k) for q in queries], IDS)
    np.testing.assert_array_equal(ranking.queries, queries)  # DBA leaves the queries as they are
    np.testing.assert_allclose(ranking.database.vectors_of(IDS), augmented, atol=1e-5)


def test_dba_then_aqe_equals_the_loop() -> None:
    queries, own = own_case()
    ranking = parse_chain("dba,aqe:n=3").search(ArrayDatabase(DATABASE, IDS), queries, 8, own)
    augmented = naive_dba(DATABASE, 2, 3.0)
    expanded = [naive_expand(q, augmented, 3, 3.0, skip=r) for q, r in zip(queries, OWN_ROWS, strict=True)]
    assert_same_top(ranking, [naive_top(q, augmented, 8) for q in expanded], IDS)


def test_stages_compose_left_to_right() -> None:
    """aqe,dba is not dba,aqe: the expansion uses whichever database the stage before left."""
    queries = QUERIES[:3]
    first = parse_chain("aqe,dba").search(ArrayDatabase(DATABASE), queries, 5)
    expanded = [naive_expand(q, DATABASE, 2, 3.0) for q in queries]
    assert_same_top(first, [naive_top(q, naive_dba(DATABASE, 2, 3.0), 5) for q in expanded], np.arange(40))
    second = parse_chain("dba,aqe").search(ArrayDatabase(DATABASE), queries, 5)
    assert not np.allclose(first.queries, second.queries)


def test_chain_search_refuses_bad_arguments() -> None:
    chain, database = parse_chain("aqe"), ArrayDatabase(DATABASE)
    with pytest.raises(ConfigError, match="k must"):
        chain.search(database, QUERIES, 0)
    with pytest.raises(ConfigError, match="own id"):
        chain.search(database, QUERIES, 3, own=np.array([1, 2]))
    with pytest.raises(ConfigError, match="dimension"):
        chain.search(database, unit_rows(2, 8), 3)


def test_evaluation_ranks_equal_the_published_formula() -> None:
    """What benchmarks/RESULTS.md measured: DBA over the whole database, then αQE of each query with its
    n = 2 nearest augmented neighbours other than its own row, ranked against the augmented database."""
    queries, _ = own_case()
    database = DATABASE
    augmented = database_side_augmentation(database)
    expected = {
        "none": rank_by_similarity(queries @ database.T),
        "aqe": rank_by_similarity(alpha_query_expansion(queries, database, exclude=OWN_ROWS) @ database.T),
        "dba": rank_by_similarity(queries @ augmented.T),
        "dba,aqe": rank_by_similarity(
            alpha_query_expansion(queries, augmented, exclude=OWN_ROWS) @ augmented.T
        ),
    }
    for chain, ranks in expected.items():
        np.testing.assert_array_equal(ranked(queries, database, chain, OWN_ROWS), ranks)
    np.testing.assert_array_equal(ranked(queries, database, "dba+aqe", OWN_ROWS), expected["dba,aqe"])


def test_evaluation_variants_speak_the_chain_language() -> None:
    assert Variant("rmac", False, "none", "dba+aqe") == Variant("rmac", False, "none", "dba,aqe")
    assert Variant("rmac", False, "none", " DBA , aqe:n=2 ").rerank == "dba,aqe"
    assert Variant("rmac", False, "none", "aqe:n=5").label == "rmac/ss/none/aqe:n=5"
    assert Variant("rmac").label == "rmac/ss/none"
    assert Variant("rmac", rerank=parse_chain("dba")).rerank == "dba"
    with pytest.raises(ConfigError, match="rerank: unknown re-ranker 'magic'"):
        Variant("rmac", False, "none", "magic")


# -- chains as text --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "canonical", "stages"),
    [
        ("none", "none", ()),
        ("", "none", ()),
        ("  NONE ", "none", ()),
        ("aqe", "aqe", (AlphaQueryExpansion(),)),
        ("dba,aqe", "dba,aqe", (DatabaseSideAugmentation(), AlphaQueryExpansion())),
        ("dba+aqe", "dba,aqe", (DatabaseSideAugmentation(), AlphaQueryExpansion())),
        (
            "dba,aqe:alpha=3,n=5",
            "dba,aqe:n=5",
            (DatabaseSideAugmentation(), AlphaQueryExpansion(n=5, alpha=3.0)),
        ),
        (
            " DBA : N=3 , aqe:Alpha=1e+1,n=4 ",
            "dba:n=3,aqe:n=4,alpha=10.0",
            (DatabaseSideAugmentation(n=3), AlphaQueryExpansion(n=4, alpha=10.0)),
        ),
        (
            "aqe:alpha=0.5+dba",
            "aqe:alpha=0.5,dba",
            (AlphaQueryExpansion(alpha=0.5), DatabaseSideAugmentation()),
        ),
        ("aqe,aqe", "aqe,aqe", (AlphaQueryExpansion(), AlphaQueryExpansion())),
    ],
)
def test_chains_parse(text: str, canonical: str, stages: tuple) -> None:
    chain = parse_chain(text)
    assert chain.stages == stages
    assert str(chain) == canonical
    assert parse_chain(str(chain)) == chain  # the canonical spelling reads back as the same chain
    assert parse_chain(chain) is chain
    assert hash(chain) == hash(parse_chain(canonical))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("magic", "unknown re-ranker 'magic'; the registered ones are aqe:n=2,alpha=3.0, dba:n=2,alpha=3.0"),
        ("dba,magic", "unknown re-ranker 'magic'"),
        ("aqe:m=1", "aqe has no option 'm'; it takes aqe:n=2,alpha=3.0"),
        ("aqe:n=0", "aqe needs n from 1 to 1000"),
        ("aqe:n=1001", "aqe needs n from 1 to 1000"),
        ("aqe:n=two", "aqe: n must be an integer, got 'two'"),
        ("aqe:n=2.5", "aqe: n must be an integer"),
        ("dba:alpha=-1", "dba needs a finite alpha ≥ 0"),
        ("aqe:alpha=nan", "aqe: alpha must be a finite number"),
        ("aqe:alpha=inf", "aqe: alpha must be a finite number"),
        ("n=2,aqe", "option 'n=2' comes before any re-ranker"),
        ("dba,,aqe", "empty stage"),
        ("dba,", "empty stage"),
        (",", "empty stage"),
        ("aqe:", "options are key=value, got ''"),
        ("aqe:n", "options are key=value, got 'n'"),
        ("aqe:n=", "options are key=value"),
        ("aqe:=3", "options are key=value"),
        ("aqe:n=1,n=2", "option 'n' is given twice"),
        ("none,aqe", "'none' stands alone"),
        ("aqe:n=2:3", "aqe: n must be an integer"),
        (",".join(["aqe"] * 9), "at most 8 stages"),
    ],
)
def test_bad_chains_say_what_exists(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("+", r"\+").replace("(", r"\(")):
        parse_chain(text)


def test_a_chain_is_text() -> None:
    with pytest.raises(ConfigError, match="text such as"):
        parse_chain(3)  # type: ignore[arg-type]
    assert parse_chain(None) == Chain()


# -- the registry is the seam ----------------------------------------------------------------------------


BUILT_IN = ("aqe", "dba", "sv", "diffusion")


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Registrations made in a test vanish after it."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    monkeypatch.setattr(registry_module, "_BY_TYPE", dict(registry_module._BY_TYPE))


def test_a_new_reranker_plugs_in_by_registering(scratch_registry: None) -> None:
    @register("keep", "keep the first `top` of the shortlist, optionally reversed")
    @dataclass(frozen=True)
    class Keep:
        top: int = 10
        reverse: bool = False

        def depth(self, k: int) -> int:
            return max(k, self.top)

        def rerank(self, ranking: Ranking) -> Ranking:
            ids, scores = ranking.ids[:, : self.top], ranking.scores[:, : self.top]
            if self.reverse:
                ids, scores = ids[:, ::-1], scores[:, ::-1]
            return dataclasses.replace(ranking, ids=ids, scores=scores)

    assert reranker_names() == (*BUILT_IN, "keep")
    assert "keep (top=10, reverse=false): keep the first" in registry_help()
    chain = parse_chain("dba,keep:top=4,reverse=yes")
    assert str(chain) == "dba,keep:top=4,reverse=true"
    assert chain.depth(2) == 4
    ranking = chain.search(ArrayDatabase(DATABASE), QUERIES[:1], k=2)
    _, rows = naive_top(QUERIES[0], naive_dba(DATABASE, 2, 3.0), 4)
    assert list(ranking.ids[0]) == rows[::-1][:2]
    with pytest.raises(ConfigError, match="reverse must be true or false"):
        parse_chain("keep:reverse=maybe")


def test_registering_refuses_what_cannot_be_a_stage(scratch_registry: None) -> None:
    with pytest.raises(ConfigError, match="already registered"):
        register("aqe", "again")(AlphaQueryExpansion)
    with pytest.raises(ConfigError, match="name"):
        register("Bad Name", "")(AlphaQueryExpansion)
    with pytest.raises(ConfigError, match="name"):
        register("none", "")(AlphaQueryExpansion)

    class NotADataclass:
        pass

    with pytest.raises(ConfigError, match="dataclass"):
        register("plain", "")(NotADataclass)

    @dataclass(frozen=True)
    class NoDefault:
        top: int

    with pytest.raises(ConfigError, match="default"):
        register("nodefault", "")(NoDefault)

    @dataclass(frozen=True)
    class ListOption:
        tops: list = dataclasses.field(default_factory=list)

    with pytest.raises(ConfigError, match="int, float, bool or str"):
        register("listy", "")(ListOption)
    assert reranker_names() == BUILT_IN
