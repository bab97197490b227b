"""Training the pairwise verifier of :mod:`lookalike.recognize.verify` on labelled pairs: the ladder
(:mod:`lookalike.evaluate.ladder`) trains every model of :data:`MODELS` on shortlists of reference-only
folds and chooses among them on validation."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from typing import Final

import numpy as np

from lookalike.errors import ConfigError
from lookalike.recognize.verify import PairVerifier, relu, sigmoid

_log = logging.getLogger(__name__)

MODELS: Final = {"logistic": 0, "mlp": 16}  # verifier name → hidden width


def train_verifier(
    features: np.ndarray,
    targets: np.ndarray,
    names: Sequence[str] | None = None,
    hidden: int = 16,
    epochs: int = 400,
    learning_rate: float = 0.02,
    l2: float = 1e-4,
    seed: int = 0,
) -> PairVerifier:
    """Fit a :class:`PairVerifier` on features ``(M, F)`` and boolean ``targets`` ``(M,)`` (same class?).

    Full-batch Adam on the mean cross-entropy plus ``l2 · ‖W‖²``; weights start from
    ``numpy.random.default_rng(seed)`` (He initialisation), biases at 0 except the output bias at the
    log-odds of the positives. ``hidden=0`` is a logistic regression.
    """
    x = np.asarray(features, dtype=np.float64)
    y = np.asarray(targets, dtype=bool).astype(np.float64)
    if x.ndim != 2 or y.shape != (x.shape[0],) or x.shape[0] < 2:
        raise ConfigError(f"training needs features (M ≥ 2, F) and targets (M,), got {x.shape}, {y.shape}")
    if not np.isfinite(x).all():
        raise ConfigError("pair features contain NaN or infinity")
    if y.min() == y.max():
        raise ConfigError("training pairs must include both same-class and different-class pairs")
    names = tuple(names) if names is not None else tuple(f"f{i}" for i in range(x.shape[1]))
    if len(names) != x.shape[1]:
        raise ConfigError(f"{len(names)} feature names for {x.shape[1]} features")
    if hidden < 0:
        raise ConfigError(f"hidden must be ≥ 0, got {hidden}")
    mean = x.mean(axis=0)
    scale = x.std(axis=0)
    scale = np.where(scale > 1e-9, scale, 1.0)
    z = (x - mean) / scale
    rng = np.random.default_rng(seed)
    widths = [x.shape[1], *([hidden] if hidden else []), 1]
    params = []
    for fan_in, fan_out in itertools.pairwise(widths):
        params += [rng.standard_normal((fan_in, fan_out)) * np.sqrt(2.0 / fan_in), np.zeros(fan_out)]
    prior = float(np.clip(y.mean(), 1e-6, 1 - 1e-6))
    params[-1][:] = np.log(prior / (1 - prior))
    moments = [(np.zeros_like(p), np.zeros_like(p)) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    m = len(y)
    for step in range(1, epochs + 1):
        grads = _gradients(params, z, y, l2)
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            first, second = moments[i]
            first[...] = beta1 * first + (1 - beta1) * g
            second[...] = beta2 * second + (1 - beta2) * g * g
            p -= learning_rate * (first / (1 - beta1**step)) / (np.sqrt(second / (1 - beta2**step)) + eps)
    verifier = PairVerifier(names, mean, scale, tuple(params[0::2]), tuple(params[1::2]))
    _log.info("verifier trained on %d pairs (%.1f%% same class), hidden=%d", m, 100 * prior, hidden)
    return verifier


def _gradients(params: list[np.ndarray], z: np.ndarray, y: np.ndarray, l2: float) -> list[np.ndarray]:
    """Gradients of the mean cross-entropy + ``l2 · Σ‖W‖²`` for layers ``[W1, b1, (W2, b2)]``."""
    m = len(y)
    if len(params) == 2:
        w, b = params
        delta = (sigmoid(z @ w + b)[:, 0] - y)[:, None] / m
        return [z.T @ delta + 2 * l2 * w, delta.sum(axis=0)]
    w1, b1, w2, b2 = params
    pre = z @ w1 + b1
    hidden = relu(pre)
    delta = (sigmoid(hidden @ w2 + b2)[:, 0] - y)[:, None] / m
    back = (delta @ w2.T) * (pre > 0)
    return [z.T @ back + 2 * l2 * w1, back.sum(axis=0), hidden.T @ delta + 2 * l2 * w2, delta.sum(axis=0)]


def train_verifiers(
    features: np.ndarray, targets: np.ndarray, names: Sequence[str], global_columns: int, seed: int = 0
) -> dict[str, PairVerifier]:
    """Every model of :data:`MODELS`, as ``<name>-global`` on the first ``global_columns`` features (no
    local-feature columns) and, when ``names`` has more columns, as ``<name>`` on all of them."""
    models = {}
    for name, hidden in MODELS.items():
        models[f"{name}-global"] = train_verifier(
            features[:, :global_columns], targets, names[:global_columns], hidden=hidden, seed=seed
        )
        if len(names) > global_columns:
            models[name] = train_verifier(features, targets, names, hidden=hidden, seed=seed)
    return models


__all__ = ["MODELS", "train_verifier", "train_verifiers"]
