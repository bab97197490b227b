"""Metric-learning losses for fine-tuning: contrastive, triplet, second-order similarity, listwise AP.

Every loss takes descriptors ``(N, D)`` — one row per image, L2-normalised as the network outputs them — and
:class:`Targets`, what is known about the rows: their class labels and, for the tuple losses, the tuple size.
That is the :class:`Loss` protocol; the training loop holds one, injected through its constructor.

Tuple layout (cirtorch's, in rows instead of its columns): the rows come as ``T`` tuples of ``S = 2 + n``
consecutive rows, query, positive, then ``n`` negatives, so tuple ``t`` is rows ``t·S … t·S + S − 1``. The
pure functions take that layout and the tuple size; the modules also check the labels agree with it (the
positive of the query's class, every negative of another).

Distances are Euclidean. With L2-normalised rows ``‖a − b‖² = 2 − 2 a·b``, so margins are on that scale:
cirtorch's contrastive margin 0.7 is a distance, the triplet margin 0.1 a difference of squared distances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn

from lookalike.errors import ConfigError

AP_BINS = 20  # Revaud et al. (ICCV 2019) use M = 20 quantisation bins
_AP_TINY = 1e-16


@dataclass(frozen=True, eq=False)
class Targets:
    """The labels of a batch's rows and, when the rows are tuples, the tuple size ``S = 2 + n_negatives``.

    ``labels`` is an ``(N,)`` integer tensor: a class index per row (in the unlabelled mode, the photo each
    augmentation came from). ``tuple_size`` is ``None`` for a plain labelled batch.
    """

    labels: Tensor
    tuple_size: int | None = None

    def __post_init__(self) -> None:
        labels = self.labels
        if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise ConfigError(
                f"labels must be a (N,) integer tensor, got {labels.dtype} {tuple(labels.shape)}"
            )
        size = self.tuple_size
        if size is not None:
            if size < 2:
                raise ConfigError(f"a tuple holds a query, a positive and negatives; got tuple size {size}")
            if labels.numel() == 0 or labels.numel() % size:
                raise ConfigError(f"{labels.numel()} rows do not make whole tuples of {size}")

    @property
    def tuples(self) -> int:
        """How many tuples the rows make (0 without a tuple layout)."""
        return 0 if self.tuple_size is None else self.labels.numel() // self.tuple_size


class Loss(Protocol):
    """A training loss: descriptors ``(N, D)`` and their :class:`Targets` to a scalar tensor."""

    def __call__(self, descriptors: Tensor, targets: Targets) -> Tensor: ...


# ---- tuple losses: pure functions of the layout ----------------------------------------------------------


def split_tuples(x: Tensor, tuple_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Rows in tuple layout → queries ``(T, D)``, positives ``(T, D)``, negatives ``(T, S − 2, D)``."""
    if x.dim() != 2:
        raise ConfigError(f"descriptors must be (N, D), got shape {tuple(x.shape)}")
    if tuple_size < 2 or x.shape[0] == 0 or x.shape[0] % tuple_size:
        raise ConfigError(f"{x.shape[0]} rows do not make whole tuples of {tuple_size} (query, positive, …)")
    t = x.reshape(-1, tuple_size, x.shape[1])
    return t[:, 0], t[:, 1], t[:, 2:]


def contrastive_loss(x: Tensor, tuple_size: int, margin: float = 0.7, eps: float = 1e-6) -> Tensor:
    """cirtorch's contrastive loss, summed over the batch:
    ``Σ_t ½ d(q_t, p_t)² + Σ_t Σ_k ½ max(0, margin − d(q_t, n_tk))²``.

    ``d(a, b) = ‖a − b + eps‖``, as cirtorch computes it (``eps`` added to every component of the
    difference), so the distance of identical rows is ``eps·√D`` rather than 0.
    """
    q, p, n = split_tuples(x, tuple_size)
    d_pos = torch.linalg.vector_norm(q - p + eps, dim=-1)
    d_neg = torch.linalg.vector_norm(q[:, None] - n + eps, dim=-1)
    return 0.5 * d_pos.pow(2).sum() + 0.5 * (margin - d_neg).clamp(min=0).pow(2).sum()


def _need_negatives(tuple_size: int, what: str) -> None:
    if tuple_size < 3:
        raise ConfigError(
            f"the {what} loss needs at least one negative per tuple; got tuple size {tuple_size}"
        )


def triplet_loss(x: Tensor, tuple_size: int, margin: float = 0.1) -> Tensor:
    """cirtorch's triplet loss, summed over every (query, positive, negative) of the batch:
    ``Σ_t Σ_k max(0, ‖q_t − p_t‖² − ‖q_t − n_tk‖² + margin)``, squared distances."""
    _need_negatives(tuple_size, "triplet")
    q, p, n = split_tuples(x, tuple_size)
    d_pos = (q - p).pow(2).sum(dim=-1)
    d_neg = (q[:, None] - n).pow(2).sum(dim=-1)
    return (d_pos[:, None] - d_neg + margin).clamp(min=0).sum()


def sos_loss(x: Tensor, tuple_size: int) -> Tensor:
    """Second-order similarity (Tian et al., CVPR 2019) in SOLAR's form (Ng et al., ECCV 2020):
    ``sqrt(Σ_t Σ_k (‖q_t − n_tk‖² − ‖p_t − n_tk‖²)²) / T``.

    A query and its positive should sit at the same distance from every negative. The root is taken as a
    vector norm, whose gradient at 0 (query equal to positive) is 0 rather than NaN.
    """
    _need_negatives(tuple_size, "SOS")
    q, p, n = split_tuples(x, tuple_size)
    d_qn = (q[:, None] - n).pow(2).sum(dim=-1)
    d_pn = (p[:, None] - n).pow(2).sum(dim=-1)
    return torch.linalg.vector_norm((d_qn - d_pn).flatten()) / q.shape[0]


# ---- listwise AP: pure functions ---------------------------------------------------------------------------


def histogram_weights(scores: Tensor, bins: int = AP_BINS, low: float = -1.0, high: float = 1.0) -> Tensor:
    """Soft assignment of each score to ``bins`` bins, ``(...)`` → ``(..., bins)``; each row sums to 1.

    Bin ``k`` is centred on ``c_k = high − k·Δ`` with ``Δ = (high − low) / (bins − 1)`` (descending, so bin 0
    holds the most similar) and takes ``max(0, 1 − |s − c_k| / Δ)``: a triangle reaching the neighbouring
    centres. The end bins saturate: scores above ``high`` go wholly to bin 0, below ``low`` to the last
    (Revaud et al.'s quantisation, as in their code).
    """
    if bins < 2:
        raise ConfigError(f"listwise AP needs at least 2 bins, got {bins}")
    if not high > low:
        raise ConfigError(f"the score range must have high > low, got [{low}, {high}]")
    delta = (high - low) / (bins - 1)
    centres = high - delta * torch.arange(bins, dtype=scores.dtype, device=scores.device)
    weights = (1.0 - (scores[..., None] - centres).abs() / delta).clamp(min=0)
    first = (1.0 - (high - scores) / delta).clamp(0, 1)
    last = (1.0 - (scores - low) / delta).clamp(0, 1)
    return torch.cat([first[..., None], weights[..., 1:-1], last[..., None]], dim=-1)


def quantized_ap(
    scores: Tensor,
    positives: Tensor,
    valid: Tensor | None = None,
    bins: int = AP_BINS,
    low: float = -1.0,
    high: float = 1.0,
) -> Tensor:
    """Histogram-binned average precision of each query (Revaud et al., "Learning with Average Precision",
    ICCV 2019): ``scores`` ``(Q, M)`` of ``M`` items, ``positives`` ``(Q, M)`` bool → ``(Q,)``.

    With ``w_jk`` from :func:`histogram_weights`, bin ``k`` holds ``n_k = Σ_j w_jk`` items of which
    ``r_k = Σ_j pos_j w_jk`` are positive; ``AP = Σ_k P_k · r_k / Σ r`` with the precision
    ``P_k = Σ_{i≤k} r_i / Σ_{i≤k} n_i`` of the bins down to ``k``. Items with ``valid`` False (the query
    itself, say) count nowhere. When every score lies on a bin centre, no two on the same one, this is the
    exact AP. A query without a valid positive gets NaN; leave such queries out.
    """
    if scores.dim() != 2 or positives.shape != scores.shape:
        raise ConfigError(
            f"scores and positives must both be (Q, M), got {tuple(scores.shape)} and {tuple(positives.shape)}"
        )
    w = histogram_weights(scores, bins, low, high)
    keep = positives.to(w.dtype) if valid is None else (positives & valid).to(w.dtype)
    counted = torch.ones_like(scores) if valid is None else valid.to(w.dtype)
    n = (w * counted[..., None]).sum(dim=1)
    r = (w * keep[..., None]).sum(dim=1)
    precision = r.cumsum(dim=-1) / (n.cumsum(dim=-1) + _AP_TINY)
    return (precision * r).sum(dim=-1) / r.sum(dim=-1)


def listwise_ap_loss(
    x: Tensor, labels: Tensor, bins: int = AP_BINS, low: float = -1.0, high: float = 1.0
) -> Tensor:
    """``1 − mean AP`` over the batch, every row in turn the query and all other rows the database.

    Scores are dot products (cosine similarities of L2-normalised rows); a row's positives are the other
    rows of its label. Rows whose label no other row shares are not queries (they still count as
    negatives); a batch without any query raises :class:`ConfigError`.
    """
    if x.dim() != 2 or labels.shape != (x.shape[0],):
        raise ConfigError(
            f"descriptors (N, D) need labels (N,), got {tuple(x.shape)} and {tuple(labels.shape)}"
        )
    scores = x @ x.T
    valid = ~torch.eye(x.shape[0], dtype=torch.bool, device=x.device)
    positives = (labels[:, None] == labels[None, :]) & valid
    queries = positives.any(dim=1)
    if not bool(queries.any()):
        raise ConfigError("listwise AP needs at least two rows of one label in the batch")
    ap = quantized_ap(scores[queries], positives[queries], valid[queries], bins, low, high)
    return 1.0 - ap.mean()


# ---- modules ---------------------------------------------------------------------------------------------


def _tuple_targets(descriptors: Tensor, targets: Targets, what: str) -> int:
    """The tuple size, after checking the rows and labels follow the tuple layout."""
    size = targets.tuple_size
    if size is None:
        raise ConfigError(f"the {what} loss needs tuples (query, positive, negatives); targets have none")
    if descriptors.dim() != 2 or descriptors.shape[0] != targets.labels.numel():
        raise ConfigError(
            f"{targets.labels.numel()} labels for descriptors of shape {tuple(descriptors.shape)}"
        )
    labels = targets.labels.reshape(-1, size)
    if bool((labels[:, 1] != labels[:, 0]).any()):
        raise ConfigError("a tuple's positive (its second row) must have the query's label")
    if bool((labels[:, 2:] == labels[:, :1]).any()):
        raise ConfigError("a tuple's negatives must have labels other than the query's")
    return size


class ContrastiveLoss(nn.Module):
    """:func:`contrastive_loss` over tuples; ``margin`` is a distance (cirtorch's default 0.7)."""

    def __init__(self, margin: float = 0.7, eps: float = 1e-6) -> None:
        super().__init__()
        if not margin > 0:
            raise ConfigError(f"the contrastive margin must be positive, got {margin}")
        self.margin = margin
        self.eps = eps

    def forward(self, descriptors: Tensor, targets: Targets) -> Tensor:
        size = _tuple_targets(descriptors, targets, "contrastive")
        return contrastive_loss(descriptors, size, self.margin, self.eps)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class TripletLoss(nn.Module):
    """:func:`triplet_loss` over tuples, summed as in cirtorch; ``margin`` on squared distances (0.1)."""

    def __init__(self, margin: float = 0.1) -> None:
        super().__init__()
        if not margin > 0:
            raise ConfigError(f"the triplet margin must be positive, got {margin}")
        self.margin = margin

    def forward(self, descriptors: Tensor, targets: Targets) -> Tensor:
        size = _tuple_targets(descriptors, targets, "triplet")
        return triplet_loss(descriptors, size, self.margin)

    def extra_repr(self) -> str:
        return f"margin={self.margin}"


class SOSLoss(nn.Module):
    """:func:`sos_loss` over tuples."""

    def forward(self, descriptors: Tensor, targets: Targets) -> Tensor:
        return sos_loss(descriptors, _tuple_targets(descriptors, targets, "SOS"))


class TripletSOSLoss(nn.Module):
    """SOLAR's training loss: ``triplet_loss / T + weight · sos_loss`` over ``T`` tuples.

    SOLAR averages the triplet term over tuples (cirtorch's :class:`TripletLoss` sums it), so ``weight``
    (λ, default 10) balances two per-tuple terms.
    """

    def __init__(self, margin: float = 0.1, weight: float = 10.0) -> None:
        super().__init__()
        if not margin > 0:
            raise ConfigError(f"the triplet margin must be positive, got {margin}")
        if not weight >= 0:
            raise ConfigError(f"the SOS weight must be non-negative, got {weight}")
        self.margin = margin
        self.weight = weight

    def forward(self, descriptors: Tensor, targets: Targets) -> Tensor:
        size = _tuple_targets(descriptors, targets, "triplet-SOS")
        tuples = descriptors.shape[0] // size
        return triplet_loss(descriptors, size, self.margin) / tuples + self.weight * sos_loss(
            descriptors, size
        )

    def extra_repr(self) -> str:
        return f"margin={self.margin}, weight={self.weight}"


class ListwiseAPLoss(nn.Module):
    """:func:`listwise_ap_loss`: ``1 − mAP`` of the batch with ``bins`` quantisation bins over the score
    range ``[low, high]`` (cosine similarities, so ``[-1, 1]`` by default). Ignores any tuple layout."""

    def __init__(self, bins: int = AP_BINS, low: float = -1.0, high: float = 1.0) -> None:
        super().__init__()
        if bins < 2:
            raise ConfigError(f"listwise AP needs at least 2 bins, got {bins}")
        if not high > low:
            raise ConfigError(f"the score range must have high > low, got [{low}, {high}]")
        self.bins = bins
        self.low = low
        self.high = high

    def forward(self, descriptors: Tensor, targets: Targets) -> Tensor:
        return listwise_ap_loss(descriptors, targets.labels, self.bins, self.low, self.high)

    def extra_repr(self) -> str:
        return f"bins={self.bins}, low={self.low}, high={self.high}"


__all__ = [
    "AP_BINS",
    "ContrastiveLoss",
    "ListwiseAPLoss",
    "Loss",
    "SOSLoss",
    "Targets",
    "TripletLoss",
    "TripletSOSLoss",
    "contrastive_loss",
    "histogram_weights",
    "listwise_ap_loss",
    "quantized_ap",
    "sos_loss",
    "split_tuples",
    "triplet_loss",
]
