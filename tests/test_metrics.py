"""Metrics: hand-computed cases (arithmetic in the comments) and slow, obvious re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lookalike.errors import ConfigError
from lookalike.evaluate.metrics import (
    accuracy,
    average_precision,
    capped_precision_at_k,
    compute_map,
    global_average_precision,
    positive_ranks,
    precision_at_k,
    protocol_gnd,
    rank_by_similarity,
    ranking_without_junk,
    recall_at_k,
    revisited_protocol,
    ukbench_score,
)

# ---- slow references, written as a walk down the ranking -------------------------------------------------


def naive_ap(ranking, ok, junk) -> float:
    """Walk the ranking; at each positive add the trapezoid between precision before and after it."""
    ok, junk = set(int(i) for i in ok), set(int(i) for i in junk) - set(int(i) for i in ok)
    seen = hits = 0
    area = 0.0
    for item in ranking:
        if item in junk:
            continue
        if item in ok:
            before = hits / seen if seen else 1.0
            hits += 1
            seen += 1
            area += (before + hits / seen) / 2 * (1 / len(ok))
        else:
            seen += 1
    return area


def naive_capped_precision(ranking, ok, junk, k) -> float:
    """1-based positions of positives after skipping junk; count those up to min(last, k), divide by that."""
    ok, junk = set(int(i) for i in ok), set(int(i) for i in junk) - set(int(i) for i in ok)
    positions, position = [], 0
    for item in ranking:
        if item in junk:
            continue
        position += 1
        if item in ok:
            positions.append(position)
    if not positions:
        return 0.0
    cap = min(positions[-1], k)
    return len([p for p in positions if p <= cap]) / cap


def naive_gap(predicted, confidences, true, known=None) -> float:
    known_query = [t is not None and (known is None or t in known) for t in true]
    made = [i for i, p in enumerate(predicted) if p is not None]
    made = sorted(made, key=lambda i: -confidences[i])  # sorted() is stable
    total, hits = 0.0, 0
    for position, i in enumerate(made, start=1):
        if known_query[i] and predicted[i] == true[i]:
            hits += 1
            total += hits / position
    return total / sum(known_query)


# ---- average precision -----------------------------------------------------------------------------------


def test_all_positives_at_the_top_give_ap_one():
    # ranks 0,1,2 of 3: each term is ½(1 + 1) (0/0 := 1, then 1/1, 2/2 …) → 3·1 / 3 = 1
    assert average_precision(np.array([0, 1, 2]), 3) == pytest.approx(1.0)


def test_no_positive_retrieved_gives_zero():
    assert average_precision(np.array([], np.int64), 3) == 0.0


@pytest.mark.parametrize(("rank", "expected"), [(0, 1.0), (1, 0.25), (3, 0.125), (9, 0.05)])
def test_single_positive_by_the_trapezoid_formula(rank, expected):
    # one positive at rank r > 0: ½(0/r + 1/(r+1)) = 1/(2(r+1)); r=1 → 1/4, r=3 → 1/8, r=9 → 1/20
    assert average_precision(np.array([rank]), 1) == pytest.approx(expected)


def test_two_positives_hand_computed():
    # ranks 0 and 2 of 2 positives: j=0: ½(1 + 1/1) = 1; j=1: ½(1/2 + 2/3) = 7/12 → (1 + 7/12)/2 = 19/24
    assert average_precision(np.array([0, 2]), 2) == pytest.approx(19 / 24)


def test_unretrieved_positives_count_through_n():
    # one of two positives found at rank 0: ½(1 + 1)/2 = 1/2
    assert average_precision(np.array([0]), 2) == pytest.approx(0.5)


def test_positives_after_junk():
    # ranking 5 9 7 3 1, positives {7, 1}, junk {5, 3} → junk-free 9 7 1 → positive ranks 1, 2
    # j=0, r=1: ½(0/1 + 1/2) = 1/4;  j=1, r=2: ½(1/2 + 2/3) = 7/12  → (1/4 + 7/12)/2 = 5/12
    ranking = np.array([5, 9, 7, 3, 1])
    assert list(ranking_without_junk(ranking, {5, 3})) == [9, 7, 1]
    found = positive_ranks(ranking, [7, 1], [5, 3])
    assert list(found) == [1, 2]
    assert average_precision(found, 2) == pytest.approx(5 / 12)


def test_an_id_both_positive_and_junk_counts_as_positive():
    assert list(positive_ranks(np.array([4, 2, 3]), [2, 3], [2])) == [1, 2]


@pytest.mark.parametrize(
    ("ranks", "n"), [(np.array([1, 1]), 2), (np.array([2, 1]), 2), (np.array([-1]), 1), (np.array([0, 1]), 1)]
)
def test_average_precision_refuses_bad_ranks(ranks, n):
    with pytest.raises(ConfigError):
        average_precision(ranks, n)


def test_average_precision_needs_a_positive():
    with pytest.raises(ConfigError):
        average_precision(np.array([], np.int64), 0)


def test_precision_and_recall_at_k():
    # positives at ranks 0, 2, 7 of 4: top-3 holds 2 → P@3 = 2/3, R@3 = 2/4
    found = np.array([0, 2, 7])
    assert precision_at_k(found, 3) == pytest.approx(2 / 3)
    assert recall_at_k(found, 4, 3) == pytest.approx(0.5)
    assert recall_at_k(found, 4, 8) == pytest.approx(0.75)


def test_capped_precision_at_k():
    # positives at 1-based 1, 2: k=10 → cap min(2, 10) = 2 → 2/2 = 1 (uncapped P@10 would be 0.2)
    assert capped_precision_at_k(np.array([0, 1]), 10) == 1.0
    # positives at 1-based 1, 7: k=5 → cap 5 → 1/5; k=10 → cap 7 → 2/7; k=1 → cap 1 → 1/1
    assert capped_precision_at_k(np.array([0, 6]), 5) == pytest.approx(0.2)
    assert capped_precision_at_k(np.array([0, 6]), 10) == pytest.approx(2 / 7)
    assert capped_precision_at_k(np.array([0, 6]), 1) == 1.0
    # first positive at 1-based 3, k=1 → cap 1 → 0/1
    assert capped_precision_at_k(np.array([2]), 1) == 0.0
    assert capped_precision_at_k(np.array([], np.int64), 5) == 0.0


# ---- compute_map -----------------------------------------------------------------------------------------


def test_compute_map_hand_computed_and_empty_query_excluded():
    ranks = np.array(
        [
            [5, 9, 7, 3, 1, 0, 2, 4, 6, 8],  # q0: ok {7, 1}, junk {5, 3}
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # q1: no positives → excluded
            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],  # q2: ok {0}
        ]
    )
    gnd = [{"ok": [7, 1], "junk": [5, 3]}, {"ok": [], "junk": [0]}, {"ok": np.array([0])}]
    result = compute_map(ranks, gnd, kappas=(1, 5, 10))
    # q0: AP 5/12 (see test_positives_after_junk); 1-based ranks 2, 3 → P@1: cap 1 → 0; P@5, P@10: cap 3 → 2/3
    # q2: AP 1; P@k: cap 1 → 1
    assert result.aps[0] == pytest.approx(5 / 12)
    assert math.isnan(result.aps[1])
    assert result.aps[2] == 1.0
    assert result.map == pytest.approx((5 / 12 + 1) / 2)  # 17/24
    np.testing.assert_allclose(result.p_at_k[0], [0, 2 / 3, 2 / 3])
    assert np.isnan(result.p_at_k[1]).all()
    np.testing.assert_allclose(result.mp_at_k, [0.5, 5 / 6, 5 / 6])
    mean_ap, aps, mp, prs = result  # unpacks like revisitop's map, aps, pr, prs
    assert mp is result.mp_at_k and prs is result.p_at_k
    assert mean_ap == result.map and aps is result.aps


def test_compute_map_truncated_ranking_misses_positives():
    # ranking holds only [3, 0]; positives {0, 8}: 0 at rank 1 → ½(0/1 + 1/2)/2 = 1/8; P@5: cap 2 → 1/2
    result = compute_map(np.array([[3, 0]]), [{"ok": [0, 8]}], kappas=(5,))
    assert result.map == pytest.approx(1 / 8)
    assert result.mp_at_k[0] == pytest.approx(0.5)


def test_compute_map_refuses_bad_input():
    with pytest.raises(ConfigError):
        compute_map(np.array([[0, 1]]), [{"ok": []}])  # no query with positives
    with pytest.raises(ConfigError):
        compute_map(np.array([[0, 1]]), [{"ok": [0]}, {"ok": [1]}])  # 1 row, 2 queries
    with pytest.raises(ConfigError):
        compute_map(np.array([[0, 1]]), [{"ok": [0]}], kappas=(0,))
    with pytest.raises(ConfigError):
        compute_map(np.array([[0.0, 1.0]]), [{"ok": [0]}])


def test_compute_map_matches_a_naive_walk_on_random_rankings():
    rng = np.random.default_rng(7)
    kappas = (1, 3, 5, 10)
    for _ in range(50):
        n_db, n_q = int(rng.integers(1, 40)), int(rng.integers(1, 8))
        ranks = np.stack([rng.permutation(n_db) for _ in range(n_q)])
        cut = int(rng.integers(1, n_db + 1))  # sometimes a truncated ranking
        ranks = ranks[:, :cut]
        gnd = []
        for _ in range(n_q):
            labels = rng.integers(0, 3, n_db)  # 0 negative, 1 positive, 2 junk
            gnd.append({"ok": np.flatnonzero(labels == 1), "junk": np.flatnonzero(labels == 2)})
        if all(len(g["ok"]) == 0 for g in gnd):
            continue
        result = compute_map(ranks, gnd, kappas)
        expected_aps, expected_prs = [], []
        for q, truth in enumerate(gnd):
            if len(truth["ok"]) == 0:
                assert math.isnan(result.aps[q])
                continue
            expected_aps.append(naive_ap(ranks[q], truth["ok"], truth["junk"]))
            expected_prs.append(
                [naive_capped_precision(ranks[q], truth["ok"], truth["junk"], k) for k in kappas]
            )
            assert result.aps[q] == pytest.approx(expected_aps[-1])
            np.testing.assert_allclose(result.p_at_k[q], expected_prs[-1])
        assert result.map == pytest.approx(np.mean(expected_aps))
        np.testing.assert_allclose(result.mp_at_k, np.mean(expected_prs, axis=0))


def test_average_precision_matches_naive_on_random_rankings():
    rng = np.random.default_rng(3)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        ranking = rng.permutation(n)
        ok = rng.choice(n, int(rng.integers(1, n + 1)), replace=False)
        junk = rng.choice(n, int(rng.integers(0, n + 1)), replace=False)
        found = positive_ranks(ranking, ok, junk)
        assert average_precision(found, len(ok)) == pytest.approx(naive_ap(ranking, ok, junk))


def test_rank_by_similarity_sorts_descending_with_stable_ties():
    similarity = np.array([[0.1, 0.9, 0.5, 0.9]])
    assert rank_by_similarity(similarity).tolist() == [[1, 3, 2, 0]]


# ---- revisited protocol ----------------------------------------------------------------------------------


def revisited_example():
    gnd = [
        {"easy": [0, 3], "hard": [5], "junk": [2]},
        {"easy": [1], "hard": [], "junk": []},  # nothing hard → left out of the Hard mean
    ]
    ranks = np.array([[2, 0, 5, 1, 3, 4, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]])
    return ranks, gnd


def test_protocol_gnd_settings():
    _, gnd = revisited_example()
    easy, medium, hard = (protocol_gnd(gnd, s)[0] for s in ("easy", "medium", "hard"))
    assert sorted(easy["ok"]) == [0, 3] and sorted(easy["junk"]) == [2, 5]
    assert sorted(medium["ok"]) == [0, 3, 5] and sorted(medium["junk"]) == [2]
    assert sorted(hard["ok"]) == [5] and sorted(hard["junk"]) == [0, 2, 3]
    with pytest.raises(ConfigError):
        protocol_gnd(gnd, "extreme")
    with pytest.raises(ConfigError):
        protocol_gnd([{"ok": [1]}], "easy")


def test_revisited_protocol_hand_computed():
    ranks, gnd = revisited_example()
    results = revisited_protocol(ranks, gnd, kappas=(1, 5))
    # q0 ranking 2 0 5 1 3 4 6 7
    #   Easy   (ok 0,3; junk 2,5): 0 1 3 4 6 7 → ranks 0, 2 → AP 19/24; 1-based 1, 3: P@1 1, P@5 cap 3 → 2/3
    #   Medium (ok 0,3,5; junk 2): 0 5 1 3 4 6 7 → ranks 0, 1, 3 → (1 + 1 + ½(2/3 + 3/4))/3 = 65/72;
    #          1-based 1, 2, 4: P@1 1, P@5 cap 4 → 3/4
    #   Hard   (ok 5; junk 2,0,3): 5 1 4 6 7 → rank 0 → AP 1, P@k 1
    # q1 ranking 7 6 5 4 3 2 1 0, ok 1 at rank 6: AP ½(0/6 + 1/7) = 1/14; P@1 cap 1 → 0, P@5 cap 5 → 0
    #   Hard: no positives → NaN, excluded
    easy, medium, hard = results["easy"], results["medium"], results["hard"]
    assert easy.map == pytest.approx((19 / 24 + 1 / 14) / 2)
    assert medium.map == pytest.approx((65 / 72 + 1 / 14) / 2)
    assert hard.map == pytest.approx(1.0)
    assert easy.mp_at_k == pytest.approx({1: 0.5, 5: 1 / 3})
    assert medium.mp_at_k == pytest.approx({1: 0.5, 5: 3 / 8})
    assert hard.mp_at_k == pytest.approx({1: 1.0, 5: 1.0})
    assert math.isnan(hard.ap[1]) and hard.ap[0] == 1.0
    assert easy.setting == "easy" and easy.p_at_k.shape == (2, 2)


# ---- GAP and accuracy ------------------------------------------------------------------------------------


def test_gap_all_correct_is_one():
    assert global_average_precision(["a", "b", "c"], [0.2, 0.9, 0.5], ["a", "b", "c"]) == 1.0


def test_gap_confident_distractor_lowers_it():
    true = [None, "a", "b"]
    predicted = ["a", "a", "b"]
    # distractor first (0.9): rel 0, 1, 1; P = 0, 1/2, 2/3; M = 2 → (1/2 + 2/3)/2 = 7/12
    assert global_average_precision(predicted, [0.9, 0.8, 0.7], true) == pytest.approx(7 / 12)
    # distractor last: rel 1, 1, 0 → (1 + 1)/2 = 1
    assert global_average_precision(predicted, [0.1, 0.8, 0.7], true) == pytest.approx(1.0)


def test_gap_m_counts_only_known_classes():
    true = ["a", "b", "z"]  # z is not a known class → distractor
    predicted = ["a", "c", "a"]
    confidences = [0.9, 0.5, 0.7]
    # order q0 (right), q2 (distractor), q1 (wrong): rel 1, 0, 0 → P(1)·1 = 1; M = 2 → 1/2
    assert global_average_precision(predicted, confidences, true, known={"a", "b"}) == pytest.approx(0.5)
    # without `known`, z is a class: M = 3 → 1/3
    assert global_average_precision(predicted, confidences, true) == pytest.approx(1 / 3)
    assert accuracy(predicted, true, known={"a", "b"}) == pytest.approx(0.5)
    assert accuracy(predicted, true) == pytest.approx(1 / 3)


def test_gap_missing_prediction_and_stable_ties():
    # q0 gives no prediction: list holds q1 only, P(1) = 1; M = 2 → 1/2
    assert global_average_precision([None, "b"], [0.0, 0.5], ["a", "b"]) == pytest.approx(0.5)
    # tie at 0.5: input order kept. wrong then right → P(2) = 1/2, M = 2 → 1/4; right then wrong → 1/2
    assert global_average_precision(["x", "b"], [0.5, 0.5], ["a", "b"]) == pytest.approx(0.25)
    assert global_average_precision(["b", "x"], [0.5, 0.5], ["b", "a"]) == pytest.approx(0.5)


def test_gap_refuses_bad_input():
    with pytest.raises(ConfigError):
        global_average_precision(["a"], [0.5], [None])
    with pytest.raises(ConfigError):
        global_average_precision(["a", "b"], [0.5], ["a", "b"])
    with pytest.raises(ConfigError):
        global_average_precision(["a"], [float("nan")], ["a"])


def test_gap_matches_naive_on_random_predictions():
    rng = np.random.default_rng(11)
    labels = ["a", "b", "c", "d", None]
    for _ in range(100):
        n = int(rng.integers(1, 30))
        true = [labels[i] for i in rng.integers(0, 5, n)]
        predicted = [labels[i] for i in rng.integers(0, 5, n)]
        confidences = list(rng.integers(0, 5, n) / 4)  # coarse, so ties happen
        known = {"a", "b", "c"} if rng.random() < 0.5 else None
        if not any(t is not None and (known is None or t in known) for t in true):
            continue
        assert global_average_precision(predicted, confidences, true, known) == pytest.approx(
            naive_gap(predicted, confidences, true, known)
        )


# ---- UKBench ---------------------------------------------------------------------------------------------


def test_ukbench_score_on_a_toy_ranking():
    groups = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    top4 = np.array(
        [
            [0, 1, 2, 3],  # 4 of group 0
            [1, 0, 4, 5],  # 2
            [2, 4, 5, 6],  # 1
            [4, 5, 6, 7],  # 0 (not even itself)
            [4, 5, 6, 7],  # 4
            [5, 4, 6, 0],  # 3
            [6, 0, 1, 2],  # 1
            [7, 6, 0, 1],  # 2
        ]
    )
    # (4 + 2 + 1 + 0 + 4 + 3 + 1 + 2) / 8 = 17/8
    assert ukbench_score(top4, groups) == pytest.approx(17 / 8)
    # only the top 4 count: longer rows give the same score
    longer = np.concatenate([top4, np.tile(np.arange(8), (8, 1))], axis=1)
    assert ukbench_score(longer, groups) == pytest.approx(17 / 8)
    # explicit query groups: two outside queries of groups 1 and 0
    assert ukbench_score(top4[:2], groups, query_groups=[1, 0]) == pytest.approx((0 + 2) / 2)
    with pytest.raises(ConfigError):
        ukbench_score(top4[:2], groups)
