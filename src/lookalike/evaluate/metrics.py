"""Retrieval and recognition metrics: revisitop mAP / mP@k (Easy, Medium, Hard), GAP, accuracy, UKBench N-S.

Conventions
-----------
* A *ranking* is a 1-D array of database ids (0-based row indices into the database), most similar first.
  ``ranks`` is ``(Q, N)``: one ranking per query, as faiss returns it in ``I`` (``-1`` padding at the end is
  harmless: it never matches a positive or a junk id). ``N`` may be shorter than the database: a positive that
  is not in the ranking counts as not retrieved. Each row should list distinct ids.
* A *ground truth* (``gnd``) is the revisitop one: a list with one dict per query. For :func:`compute_map` the
  keys are ``'ok'`` (positive ids) and optionally ``'junk'`` (ids removed from the ranking before scoring, e.g.
  the query itself); for :func:`revisited_protocol` they are ``'easy'``, ``'hard'`` and ``'junk'``.

The mAP / mP@k semantics are those of ``compute_ap`` / ``compute_map`` in revisitop's ``python/evaluate.py``
(Radenović et al., "Revisiting Oxford and Paris", CVPR 2018), reimplemented here vectorised; every function is
pure and returns plain floats or arrays.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from lookalike.errors import ConfigError

__all__ = [
    "SETTINGS",
    "MapResult",
    "ProtocolResult",
    "accuracy",
    "average_precision",
    "capped_precision_at_k",
    "compute_map",
    "global_average_precision",
    "positive_ranks",
    "precision_at_k",
    "protocol_gnd",
    "rank_by_similarity",
    "ranking_without_junk",
    "recall_at_k",
    "revisited_protocol",
    "ukbench_score",
]

SETTINGS: tuple[str, ...] = ("easy", "medium", "hard")
DEFAULT_KAPPAS: tuple[int, ...] = (1, 5, 10)


# ---- one ranking -----------------------------------------------------------------------------------------


def _ids(values: Iterable[int] | np.ndarray | None) -> np.ndarray:
    """A 1-D int64 array of ids from a list, set, array or None."""
    if values is None:
        return np.empty(0, np.int64)
    if isinstance(values, set | frozenset):
        values = sorted(values)
    array = np.asarray(values)
    if array.size == 0:
        return np.empty(0, np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise ConfigError(f"ids must be a 1-D collection of integers, got shape {array.shape} {array.dtype}")
    return array.astype(np.int64, copy=False)


def rank_by_similarity(similarity: np.ndarray) -> np.ndarray:
    """``(Q, N)`` database ids sorted by decreasing similarity, per row; ties keep the lower id first."""
    similarity = np.asarray(similarity)
    if similarity.ndim != 2:
        raise ConfigError(f"similarity must be (Q, N), got shape {similarity.shape}")
    return np.argsort(-similarity, axis=1, kind="stable").astype(np.int64)


def ranking_without_junk(ranking: np.ndarray, junk: Iterable[int] | np.ndarray | None) -> np.ndarray:
    """``ranking`` with every id in ``junk`` removed, order kept: ``(N,) -> (N',)``."""
    ranking = np.asarray(ranking)
    if ranking.ndim != 1:
        raise ConfigError(f"a ranking must be 1-D, got shape {ranking.shape}")
    junk_ids = _ids(junk)
    if junk_ids.size == 0:
        return ranking
    return ranking[~np.isin(ranking, junk_ids)]


def positive_ranks(
    ranking: np.ndarray,
    positives: Iterable[int] | np.ndarray,
    junk: Iterable[int] | np.ndarray | None = None,
) -> np.ndarray:
    """0-based ranks of the retrieved positives in the junk-free ranking, increasing.

    An id listed both as positive and as junk counts as a positive. (revisitop's loop would keep it in place
    for itself yet shift later positives up as if it had been removed; its Easy/Medium/Hard sets never
    overlap, so this matters only for hand-made ground truths.)
    """
    positive_ids = _ids(positives)
    junk_ids = _ids(junk)
    if junk_ids.size and positive_ids.size:
        junk_ids = junk_ids[~np.isin(junk_ids, positive_ids)]
    kept = ranking_without_junk(ranking, junk_ids)
    return np.flatnonzero(np.isin(kept, positive_ids)).astype(np.int64)


def average_precision(ranks_of_positives: np.ndarray, n_positives: int) -> float:
    """Average precision by the trapezoid rule over the precision/recall curve (revisitop ``compute_ap``).

    With ``r_0 < r_1 < …`` the 0-based ranks of the retrieved positives in the junk-free ranking and ``n`` the
    total number of positives (retrieved or not)::

        AP = (1/n) · Σ_j ½ · ( j / r_j  +  (j+1) / (r_j+1) ),     with  j / r_j := 1  when  r_j = 0.

    Each retrieved positive raises recall by ``1/n``; the area of that step is the mean of the precision just
    before it (``j`` hits among the first ``r_j`` results) and just after it (``j+1`` among ``r_j+1``).
    Unretrieved positives add no area, so they lower AP through ``n``. A single positive at rank ``r > 0``
    gives ``1 / (2(r+1))`` — half the usual non-interpolated value ``1/(r+1)``; at rank 0 it gives 1.
    """
    ranks = np.asarray(ranks_of_positives)
    if ranks.size == 0:
        ranks = np.empty(0, np.int64)
    if ranks.ndim != 1 or (ranks.size and not np.issubdtype(ranks.dtype, np.integer)):
        raise ConfigError(f"ranks of positives must be a 1-D integer array, got {ranks.shape} {ranks.dtype}")
    if n_positives < 1:
        raise ConfigError(f"average precision needs at least one positive, got n_positives={n_positives}")
    if len(ranks) > n_positives:
        raise ConfigError(f"{len(ranks)} ranks given for only {n_positives} positives")
    if ranks.size and (ranks[0] < 0 or np.any(np.diff(ranks) <= 0)):
        raise ConfigError("ranks of positives must be non-negative and strictly increasing")
    j = np.arange(len(ranks), dtype=np.float64)
    r = ranks.astype(np.float64)
    before = np.divide(j, r, out=np.ones_like(j), where=r > 0)
    after = (j + 1) / (r + 1)
    return float(np.sum(before + after) / (2.0 * n_positives))


def precision_at_k(ranks_of_positives: np.ndarray, k: int) -> float:
    """Fraction of the first ``k`` (junk-free) results that are positives: ``#{r_j < k} / k``."""
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    return float(np.count_nonzero(np.asarray(ranks_of_positives) < k) / k)


def recall_at_k(ranks_of_positives: np.ndarray, n_positives: int, k: int) -> float:
    """Fraction of all ``n_positives`` positives found among the first ``k`` results: ``#{r_j < k} / n``."""
    if k < 1 or n_positives < 1:
        raise ConfigError(f"k and n_positives must be at least 1, got k={k}, n_positives={n_positives}")
    return float(np.count_nonzero(np.asarray(ranks_of_positives) < k) / n_positives)


def capped_precision_at_k(ranks_of_positives: np.ndarray, k: int) -> float:
    """revisitop's precision at ``k`` with the cap ``k_q = min(last positive's 1-based rank, k)``.

    ``P = #{positives with 1-based rank ≤ k_q} / k_q``, ranks taken after junk removal. The cap means a query
    whose retrieved positives all sit in the top ``k`` is not penalised for having fewer than ``k`` of them:
    two positives at ranks 1 and 2 give P@10 = 2/2 = 1. The last positive is the last *retrieved* one; a
    query with no retrieved positive scores 0 (revisitop itself fails on ``max`` of an empty array there,
    which cannot happen with its full rankings).
    """
    if k < 1:
        raise ConfigError(f"k must be at least 1, got {k}")
    one_based = np.asarray(ranks_of_positives) + 1
    if one_based.size == 0:
        return 0.0
    cap = min(int(one_based.max()), k)
    return float(np.count_nonzero(one_based <= cap) / cap)


# ---- many queries ----------------------------------------------------------------------------------------


class MapResult(NamedTuple):
    """``compute_map``'s answer; unpacks like revisitop's ``map, aps, pr, prs``."""

    map: float
    """Mean AP over the queries that have at least one positive."""
    aps: np.ndarray
    """(Q,) AP per query; NaN for a query without positives (as revisitop)."""
    mp_at_k: np.ndarray
    """(K,) mean capped precision at each kappa, over the queries with positives."""
    p_at_k: np.ndarray
    """(Q, K) capped precision per query and kappa; NaN rows for queries without positives."""


def _check_ranks(ranks: np.ndarray, n_queries: int) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or not np.issubdtype(ranks.dtype, np.integer):
        raise ConfigError(f"ranks must be a (Q, N) integer array, got shape {ranks.shape} {ranks.dtype}")
    if ranks.shape[0] != n_queries:
        raise ConfigError(f"ranks has {ranks.shape[0]} rows but the ground truth has {n_queries} queries")
    return ranks


def _check_kappas(kappas: Sequence[int]) -> tuple[int, ...]:
    kappas = tuple(int(k) for k in kappas)
    if any(k < 1 for k in kappas):
        raise ConfigError(f"every kappa must be at least 1, got {kappas}")
    return kappas


def compute_map(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Iterable[int] | np.ndarray]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> MapResult:
    """mAP and mP@k of ``ranks`` ``(Q, N)`` against ``gnd`` (``'ok'`` and optional ``'junk'`` per query).

    Per query ``q`` with positives ``ok_q`` (distinct ids) and junk ``junk_q``:

    * the ranking is stripped of junk (:func:`ranking_without_junk`), the 0-based ranks of the positives in
      what is left are taken (:func:`positive_ranks`), and ``AP_q = average_precision(those, |ok_q|)``;
    * ``P@k_q = #{1-based rank ≤ k_q} / k_q`` with ``k_q = min(last positive's 1-based rank, k)``
      (:func:`capped_precision_at_k`).

    A query with no positives is left out of both means (its AP and P@k are NaN, as in revisitop); ``map`` and
    ``mp_at_k`` average over the others. If no query has a positive the means are undefined and a
    ``ConfigError`` is raised.
    """
    ranks = _check_ranks(ranks, len(gnd))
    kappas = _check_kappas(kappas)
    aps = np.full(len(gnd), np.nan)
    p_at_k = np.full((len(gnd), len(kappas)), np.nan)
    for q, truth in enumerate(gnd):
        if "ok" not in truth:
            raise ConfigError(f"ground truth of query {q} has no 'ok' entry")
        positives = np.unique(_ids(truth["ok"]))
        if positives.size == 0:
            continue
        found = positive_ranks(ranks[q], positives, truth.get("junk"))
        aps[q] = average_precision(found, len(positives))
        p_at_k[q] = [capped_precision_at_k(found, k) for k in kappas]
    scored = ~np.isnan(aps)
    if not scored.any():
        raise ConfigError("no query has a positive: mAP is undefined")
    return MapResult(float(aps[scored].mean()), aps, p_at_k[scored].mean(axis=0), p_at_k)


def protocol_gnd(
    gnd: Sequence[Mapping[str, Iterable[int] | np.ndarray]], setting: str
) -> list[dict[str, np.ndarray]]:
    """The ``'ok'`` / ``'junk'`` ground truth of one revisited setting, from ``'easy'``/``'hard'``/``'junk'``.

    * ``easy``:   ok = easy,          junk = junk + hard
    * ``medium``: ok = easy + hard,   junk = junk
    * ``hard``:   ok = hard,          junk = junk + easy
    """
    parts = {
        "easy": (("easy",), ("junk", "hard")),
        "medium": (("easy", "hard"), ("junk",)),
        "hard": (("hard",), ("junk", "easy")),
    }
    if setting not in parts:
        raise ConfigError(f"unknown setting {setting!r}; expected one of {SETTINGS}")
    ok_keys, junk_keys = parts[setting]
    try:
        return [
            {
                "ok": np.concatenate([_ids(truth[key]) for key in ok_keys]),
                "junk": np.concatenate([_ids(truth[key]) for key in junk_keys]),
            }
            for truth in gnd
        ]
    except KeyError as missing:
        raise ConfigError(
            f"revisited ground truth needs 'easy', 'hard' and 'junk'; missing {missing}"
        ) from None


@dataclass(frozen=True, eq=False)
class ProtocolResult:
    """One setting of the revisited protocol."""

    setting: str
    map: float
    mp_at_k: dict[int, float]
    ap: np.ndarray
    """(Q,) AP per query, NaN where the query has no positive in this setting."""
    p_at_k: np.ndarray
    """(Q, K) capped precision per query, columns in the order of ``mp_at_k``."""


def revisited_protocol(
    ranks: np.ndarray,
    gnd: Sequence[Mapping[str, Iterable[int] | np.ndarray]],
    kappas: Sequence[int] = DEFAULT_KAPPAS,
) -> dict[str, ProtocolResult]:
    """Easy, Medium and Hard results of ``ranks`` ``(Q, N)`` on a revisited ground truth (see :func:`protocol_gnd`)."""
    kappas = _check_kappas(kappas)
    results = {}
    for setting in SETTINGS:
        result = compute_map(ranks, protocol_gnd(gnd, setting), kappas)
        mp_at_k = {k: float(value) for k, value in zip(kappas, result.mp_at_k, strict=True)}
        results[setting] = ProtocolResult(setting, result.map, mp_at_k, result.aps, result.p_at_k)
    return results


# ---- recognition -----------------------------------------------------------------------------------------


def _distractor_mask(true_labels: Sequence[Hashable | None], known: Iterable[Hashable] | None) -> np.ndarray:
    known_set = None if known is None else set(known)
    return np.array(
        [label is None or (known_set is not None and label not in known_set) for label in true_labels], bool
    )


def global_average_precision(
    predicted_labels: Sequence[Hashable | None],
    confidences: Sequence[float] | np.ndarray,
    true_labels: Sequence[Hashable | None],
    known: Iterable[Hashable] | None = None,
) -> float:
    """Global average precision (micro-AP; Weyand et al., Google Landmarks recognition challenge).

    One prediction per query. Sort the predictions by confidence, highest first; then::

        GAP = (1/M) · Σ_i P(i) · rel(i)

    where ``rel(i) = 1`` if the i-th prediction is correct, ``P(i)`` is the precision of the first ``i``
    predictions, and ``M`` is the number of queries whose true label is a known class. A query is a
    *distractor* if its true label is ``None`` or (when ``known`` is given) not in ``known``; its prediction
    is never correct, so it only lowers the precision of the predictions ranked after it, and it is not
    counted in ``M``. A predicted label ``None`` means "no prediction": that query is left out of the sorted
    list (for a known-class query this still costs, through ``M``). Equal confidences keep the input order
    (stable sort). Raises ``ConfigError`` if no query is of a known class.
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    if not (len(predicted_labels) == len(true_labels) == len(confidences)) or confidences.ndim != 1:
        raise ConfigError("predicted_labels, confidences and true_labels must be 1-D and of equal length")
    if np.isnan(confidences).any():
        raise ConfigError("confidences contain NaN")
    distractor = _distractor_mask(true_labels, known)
    n_known = int(np.count_nonzero(~distractor))
    if n_known == 0:
        raise ConfigError("no query has a known true label: GAP is undefined")
    made = np.array([label is not None for label in predicted_labels], bool)
    correct = np.array(
        [
            bool(m and not d and p == t)
            for p, t, m, d in zip(predicted_labels, true_labels, made, distractor, strict=True)
        ],
        bool,
    )
    order = np.flatnonzero(made)[np.argsort(-confidences[made], kind="stable")]
    relevant = correct[order].astype(np.float64)
    precision = np.cumsum(relevant) / np.arange(1, len(order) + 1)
    return float(np.sum(precision * relevant) / n_known)


def accuracy(
    predicted_labels: Sequence[Hashable | None],
    true_labels: Sequence[Hashable | None],
    known: Iterable[Hashable] | None = None,
) -> float:
    """Fraction of the non-distractor queries (see :func:`global_average_precision`) predicted correctly."""
    if len(predicted_labels) != len(true_labels):
        raise ConfigError("predicted_labels and true_labels must have equal length")
    distractor = _distractor_mask(true_labels, known)
    if distractor.all():
        raise ConfigError("no query has a known true label: accuracy is undefined")
    hits = sum(
        p is not None and p == t
        for p, t, d in zip(predicted_labels, true_labels, distractor, strict=True)
        if not d
    )
    return hits / int(np.count_nonzero(~distractor))


def ukbench_score(
    ranks: np.ndarray,
    groups: Sequence[int] | np.ndarray,
    query_groups: Sequence[int] | np.ndarray | None = None,
) -> float:
    """UKBench N-S score: mean over queries of how many of the top 4 results share the query's group (0–4).

    UKBench (Nistér & Stewénius 2006) uses every image as a query against all images, the query included, so
    a perfect system scores 4 (the query itself plus its three siblings). ``groups`` ``(N,)`` gives each
    database image's group; by default query ``q`` is database image ``q`` (``ranks`` must then have one row
    per database image), otherwise ``query_groups`` ``(Q,)`` gives the queries' groups. Whether the query is
    in its own ranking is up to the caller: leave it in for the standard score.
    """
    ranks = np.asarray(ranks)
    groups = np.asarray(groups)
    if ranks.ndim != 2 or groups.ndim != 1:
        raise ConfigError(f"ranks must be (Q, N) and groups (N,), got {ranks.shape} and {groups.shape}")
    if query_groups is None:
        if ranks.shape[0] != len(groups):
            raise ConfigError("without query_groups, ranks needs one row per database image")
        query_groups = groups
    query_groups = np.asarray(query_groups)
    if query_groups.shape != (ranks.shape[0],):
        raise ConfigError(f"query_groups must be ({ranks.shape[0]},), got {query_groups.shape}")
    if ranks.shape[0] == 0:
        raise ConfigError("no queries")
    top = ranks[:, :4]
    if top.size and (top.min() < 0 or top.max() >= len(groups)):
        raise ConfigError("ranks hold ids outside the database")
    return float(np.mean(np.sum(groups[top] == query_groups[:, None], axis=1)))
