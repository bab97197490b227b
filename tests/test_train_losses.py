"""Training losses against slow python loops, hand-computed APs and their limiting cases."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lookalike.errors import ConfigError
from lookalike.train.losses import (
    ContrastiveLoss,
    ListwiseAPLoss,
    Loss,
    SOSLoss,
    Targets,
    TripletLoss,
    TripletSOSLoss,
    histogram_weights,
    quantized_ap,
)

TUPLES, NEGATIVES, DIM = 3, 4, 8
SIZE = 2 + NEGATIVES


def l2n(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


def tuple_batch(seed: int = 0, tuples: int = TUPLES, size: int = SIZE) -> tuple[torch.Tensor, Targets]:
    """L2-normalised float64 rows in tuple layout, with labels: query and positive share a class per tuple."""
    g = torch.Generator().manual_seed(seed)
    x = l2n(torch.randn(tuples * size, DIM, generator=g, dtype=torch.float64))
    labels = []
    for t in range(tuples):
        labels += [t, t] + [100 + t * size + k for k in range(size - 2)]
    return x, Targets(torch.tensor(labels), size)


def rows(x: torch.Tensor) -> list[list[float]]:
    return x.detach().tolist()


def dist(a: list[float], b: list[float], eps: float = 0.0) -> float:
    return math.sqrt(sum((ai - bi + eps) ** 2 for ai, bi in zip(a, b, strict=True)))


def naive_contrastive(x: torch.Tensor, size: int, margin: float, eps: float = 1e-6) -> float:
    r, total = rows(x), 0.0
    for start in range(0, len(r), size):
        q = r[start]
        total += 0.5 * dist(q, r[start + 1], eps) ** 2
        for k in range(start + 2, start + size):
            total += 0.5 * max(0.0, margin - dist(q, r[k], eps)) ** 2
    return total


def naive_triplet(x: torch.Tensor, size: int, margin: float) -> float:
    r, total = rows(x), 0.0
    for start in range(0, len(r), size):
        q, p = r[start], r[start + 1]
        for k in range(start + 2, start + size):
            total += max(0.0, dist(q, p) ** 2 - dist(q, r[k]) ** 2 + margin)
    return total


def naive_sos(x: torch.Tensor, size: int) -> float:
    r, total = rows(x), 0.0
    for start in range(0, len(r), size):
        q, p = r[start], r[start + 1]
        for k in range(start + 2, start + size):
            total += (dist(q, r[k]) ** 2 - dist(p, r[k]) ** 2) ** 2
    return math.sqrt(total) / (len(r) // size)


def naive_bin_weight(s: float, k: int, bins: int, low: float, high: float) -> float:
    delta = (high - low) / (bins - 1)
    centre = high - k * delta
    if (k == 0 and s >= high) or (k == bins - 1 and s <= low):
        return 1.0
    return max(0.0, 1.0 - abs(s - centre) / delta)


def naive_quantized_ap(
    scores: list[float], positive: list[bool], bins: int, low: float, high: float
) -> float:
    counts, hits = [0.0] * bins, [0.0] * bins
    for s, pos in zip(scores, positive, strict=True):
        for k in range(bins):
            w = naive_bin_weight(s, k, bins, low, high)
            counts[k] += w
            hits[k] += w if pos else 0.0
    ap, seen, found = 0.0, 0.0, 0.0
    for k in range(bins):
        seen += counts[k]
        found += hits[k]
        ap += (found / (seen + 1e-16)) * hits[k] / sum(hits)
    return ap


def naive_listwise(
    x: torch.Tensor, labels: list[int], bins: int, low: float = -1.0, high: float = 1.0
) -> float:
    r, aps = rows(x), []
    for i in range(len(r)):
        others = [j for j in range(len(r)) if j != i]
        positive = [labels[j] == labels[i] for j in others]
        if not any(positive):
            continue
        scores = [sum(a * b for a, b in zip(r[i], r[j], strict=True)) for j in others]
        aps.append(naive_quantized_ap(scores, positive, bins, low, high))
    return 1.0 - sum(aps) / len(aps)


def exact_ap(scores: list[float], positive: list[bool]) -> float:
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits, total = 0, 0.0
    for rank, i in enumerate(order, start=1):
        if positive[i]:
            hits += 1
            total += hits / rank
    return total / hits


# ---- reference tests ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.7, 1.3])
def test_contrastive_equals_loop(seed, margin):
    x, targets = tuple_batch(seed)
    got = ContrastiveLoss(margin)(x, targets)
    assert got.item() == pytest.approx(naive_contrastive(x, SIZE, margin), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("margin", [0.1, 0.5])
def test_triplet_equals_loop(seed, margin):
    x, targets = tuple_batch(seed)
    got = TripletLoss(margin)(x, targets)
    assert got.item() == pytest.approx(naive_triplet(x, SIZE, margin), abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sos_and_triplet_sos_equal_loops(seed):
    x, targets = tuple_batch(seed)
    assert SOSLoss()(x, targets).item() == pytest.approx(naive_sos(x, SIZE), abs=1e-5)
    combined = TripletSOSLoss(margin=0.1, weight=10.0)(x, targets).item()
    expected = naive_triplet(x, SIZE, 0.1) / TUPLES + 10.0 * naive_sos(x, SIZE)
    assert combined == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("bins", [2, 5, 20])
def test_listwise_ap_equals_loop(seed, bins):
    g = torch.Generator().manual_seed(seed)
    x = l2n(torch.randn(10, DIM, generator=g, dtype=torch.float64))
    labels = [0, 0, 0, 1, 1, 2, 2, 2, 2, 3]  # class 3 has no positive: not a query, still a negative
    got = ListwiseAPLoss(bins)(x, Targets(torch.tensor(labels)))
    assert got.item() == pytest.approx(naive_listwise(x, labels, bins), abs=1e-5)


def test_listwise_ap_with_a_narrow_range_saturates_end_bins_like_the_loop():
    g = torch.Generator().manual_seed(3)
    x = l2n(torch.randn(8, DIM, generator=g, dtype=torch.float64))
    labels = [0, 0, 1, 1, 1, 2, 2, 3]
    got = ListwiseAPLoss(bins=6, low=-0.2, high=0.3)(x, Targets(torch.tensor(labels)))
    assert got.item() == pytest.approx(naive_listwise(x, labels, 6, -0.2, 0.3), abs=1e-5)


def test_histogram_weights_partition_unity_and_match_loop():
    scores = torch.linspace(-1.3, 1.3, 57, dtype=torch.float64)
    w = histogram_weights(scores, bins=7)
    assert torch.allclose(w.sum(dim=1), torch.ones(57, dtype=torch.float64))
    for i, s in enumerate(scores.tolist()):
        for k in range(7):
            assert w[i, k].item() == pytest.approx(naive_bin_weight(s, k, 7, -1.0, 1.0), abs=1e-12)


def test_quantized_ap_is_the_exact_ap_when_scores_sit_on_distinct_bin_centres():
    bins = 11  # centres 1.0, 0.8, …, -1.0
    scores = [1.0, 0.6, 0.4, 0.0, -0.2, -0.8]
    positive = [True, False, True, False, True, False]
    got = quantized_ap(torch.tensor([scores], dtype=torch.float64), torch.tensor([positive]), bins=bins)
    assert got.item() == pytest.approx(exact_ap(scores, positive), abs=1e-12)
    assert got.item() == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3, abs=1e-12)


# ---- limiting cases ----------------------------------------------------------------------------------------


def test_identical_query_and_positive_give_no_positive_term():
    x, targets = tuple_batch(0, tuples=1, size=3)
    x = x.clone()
    x[1] = x[0]
    x[2] = -x[0]  # distance 2, beyond every margin: no negative term either
    assert ContrastiveLoss(0.7)(x, targets).item() == pytest.approx(0.0, abs=1e-9)
    assert TripletLoss(0.1)(x, targets).item() == pytest.approx(0.0, abs=1e-12)
    assert SOSLoss()(x, targets).item() == pytest.approx(0.0, abs=1e-12)


def test_triplet_at_equal_distances_is_the_margin_per_negative():
    x, targets = tuple_batch(0, tuples=2, size=4)
    x = x.clone()
    for start in (0, 4):
        x[start + 1] = x[start + 2] = x[start + 3] = x[start]  # every distance 0
    assert TripletLoss(0.25)(x, targets).item() == pytest.approx(2 * 2 * 0.25)


def test_perfectly_separated_batch_has_zero_ap_loss():
    base = l2n(torch.eye(3, DIM, dtype=torch.float64))
    x = torch.cat([base, base])  # two copies of three orthogonal rows: positives at 1, negatives at 0
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    assert ListwiseAPLoss(bins=11)(x, Targets(labels)).item() == pytest.approx(0.0, abs=1e-12)


# ---- gradients and float32 ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "loss",
    [ContrastiveLoss(), TripletLoss(margin=0.5), SOSLoss(), TripletSOSLoss(), ListwiseAPLoss()],
    ids=lambda loss: type(loss).__name__,
)
def test_gradients_flow_in_float32(loss: Loss):
    x64, targets = tuple_batch(4)
    leaf = x64.float().requires_grad_(True)
    value = loss(l2n(leaf), targets)
    assert value.dtype == torch.float32 and value.dim() == 0
    value.backward()
    assert leaf.grad is not None and torch.isfinite(leaf.grad).all() and leaf.grad.abs().sum() > 0


def test_sos_gradient_is_finite_when_query_equals_positive():
    x, targets = tuple_batch(0, tuples=1, size=3)
    x = x.clone()
    x[1] = x[0]
    x.requires_grad_(True)
    SOSLoss()(x, targets).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_contrastive_gradient_matches_finite_differences():
    x, targets = tuple_batch(5, tuples=2, size=4)
    x = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: ContrastiveLoss(0.9)(t, targets), (x,))


# ---- refused inputs ------------------------------------------------------------------------------------------


def test_tuple_losses_refuse_a_batch_without_tuple_layout():
    x, targets = tuple_batch(0)
    with pytest.raises(ConfigError, match="needs tuples"):
        TripletLoss()(x, Targets(targets.labels))


def test_tuple_losses_check_labels_follow_the_layout():
    x, targets = tuple_batch(0)
    wrong_positive = targets.labels.clone()
    wrong_positive[1] = 99
    with pytest.raises(ConfigError, match="positive"):
        ContrastiveLoss()(x, Targets(wrong_positive, SIZE))
    wrong_negative = targets.labels.clone()
    wrong_negative[2] = wrong_negative[0]
    with pytest.raises(ConfigError, match="negatives"):
        TripletLoss()(x, Targets(wrong_negative, SIZE))


def test_targets_refuse_partial_tuples_and_float_labels():
    with pytest.raises(ConfigError, match="whole tuples"):
        Targets(torch.arange(7), 3)
    with pytest.raises(ConfigError, match="integer"):
        Targets(torch.zeros(6))
    assert Targets(torch.arange(6), 3).tuples == 2


def test_triplet_needs_a_negative_and_ap_needs_a_query():
    x, _ = tuple_batch(0, tuples=2, size=2)
    with pytest.raises(ConfigError, match="at least one negative"):
        TripletLoss()(x, Targets(torch.tensor([0, 0, 1, 1]), 2))
    with pytest.raises(ConfigError, match="two rows of one label"):
        ListwiseAPLoss()(x, Targets(torch.arange(4)))


def test_float32_and_float64_agree():
    x, targets = tuple_batch(6)
    for loss in (ContrastiveLoss(), TripletLoss(), SOSLoss(), ListwiseAPLoss()):
        a = loss(x, targets).item()
        b = loss(x.float(), targets).item()
        assert np.isclose(a, b, atol=1e-5), type(loss).__name__
