"""The descriptor spaces the recognition ladder (:mod:`lookalike.evaluate.ladder`) votes in, and its
configurations: a space, a voting rule, a transform, ``k`` and ``α``. Each has a readable name for a scale
list (``describe``), the one the result tables print, and a JSON-ready ``record``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from lookalike.errors import ConfigError
from lookalike.recognize.knn import METHODS

SYMBOLS: Final = {"identity": "x", "square": "x²", "sqrt": "√x", "log": "ln(x+e)"}


@dataclass(frozen=True)
class AggregatedSpace:
    """The scales with a non-zero weight summed and L2-normalised (one weight per scale, as
    :func:`~lookalike.recognize.multiscale.aggregate`), PCA-whitened on the references if ``whitened``."""

    weights: tuple[float, ...]
    whitened: bool = False

    def __post_init__(self) -> None:
        if not any(self.weights):
            raise ConfigError(f"an aggregated space needs at least one scale, got weights {self.weights}")

    def describe(self, scales: Sequence[float]) -> str:
        chosen = [f"{s:.2g}" for s, w in zip(scales, self.weights, strict=True) if w]
        text = f"scale {chosen[0]}" if len(chosen) == 1 else f"scales {'+'.join(chosen)} summed"
        return text + (", PCA-whitened" if self.whitened else "")

    def record(self) -> dict[str, Any]:
        return {"kind": "aggregated", "weights": list(self.weights), "whitened": self.whitened}


@dataclass(frozen=True)
class MatrixSpace:
    """Multi-scale similarity matrices reduced by ``reducer`` (a name in
    :data:`~lookalike.recognize.multiscale.REDUCERS`), each scale whitened on its own if ``whitened``."""

    reducer: str
    whitened: bool = True

    def describe(self, scales: Sequence[float]) -> str:
        n = len(scales)
        return f"{n}×{n} similarity matrix, {self.reducer}" + (
            ", whitened per scale" if self.whitened else ""
        )

    def record(self) -> dict[str, Any]:
        return {"kind": "matrix", "reducer": self.reducer, "whitened": self.whitened}


@dataclass(frozen=True)
class VerifiedSpace:
    """The ``top`` of the ``base`` space's shortlist re-scored by the verifier ``model`` with the
    re-scoring ``rule`` (:func:`~lookalike.recognize.verify.rescore`)."""

    base: AggregatedSpace | MatrixSpace
    model: str
    rule: str
    top: int

    def describe(self, scales: Sequence[float]) -> str:
        how = "s·P(same)" if self.rule == "product" else "P(same)"
        return f"{self.base.describe(scales)}, top {self.top} re-scored by the {self.model} verifier ({how})"

    def record(self) -> dict[str, Any]:
        return {
            "kind": "verified",
            "base": self.base.record(),
            "model": self.model,
            "rule": self.rule,
            "top": self.top,
        }


Space = AggregatedSpace | MatrixSpace | VerifiedSpace


@dataclass(frozen=True)
class Config:
    """One configuration: a descriptor ``space``, a voting ``rule`` (``1nn``, ``knn``, ``mean``,
    ``alpha``; see :mod:`lookalike.recognize.knn`), a transform name, ``k`` and ``alpha``."""

    space: Space
    rule: str = "knn"
    transform: str = "identity"
    k: int = 1
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.rule not in METHODS:
            raise ConfigError(f"unknown rule {self.rule!r}; expected one of {', '.join(METHODS)}")

    def describe(self, scales: Sequence[float]) -> str:
        """Readable name, e.g. ``k-NN √x, k=7 — scales 0.25+1 summed, PCA-whitened``."""
        sym = SYMBOLS.get(self.transform, self.transform)
        rule = {
            "1nn": "1-NN",
            "knn": f"k-NN {sym}, k={self.k}",
            "mean": f"mean k-NN {sym}, k={self.k}",
            "alpha": f"α-expanded mean k-NN {sym}, k={self.k}, α={self.alpha}",
        }[self.rule]
        return f"{rule} — {self.space.describe(scales)}"

    def record(self) -> dict[str, Any]:
        return {
            "space": self.space.record(),
            "rule": self.rule,
            "transform": self.transform,
            "k": self.k,
            "alpha": self.alpha,
        }


__all__ = ["SYMBOLS", "AggregatedSpace", "Config", "MatrixSpace", "Space", "VerifiedSpace"]
