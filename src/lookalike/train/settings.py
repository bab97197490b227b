"""What a fine-tuning run is: :class:`TrainSettings`, every default in one place, and the losses by name.

Two runs with equal settings train the same network from the same data, so a checkpoint records its
settings and a run resumes only one with the same (:meth:`TrainSettings.differences`); only ``epochs``
may grow.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

from lookalike.errors import ConfigError
from lookalike.registry import DEFAULT_MODEL
from lookalike.train.losses import (
    AP_BINS,
    ContrastiveLoss,
    ListwiseAPLoss,
    Loss,
    TripletLoss,
    TripletSOSLoss,
)
from lookalike.train.tuples import DEFAULT_NEGATIVES

PRECISIONS: Final = ("auto", "fp32", "bf16")
POSITIVE_RULES: Final = ("nearest", "random")


@dataclass(frozen=True)
class TrainSettings:
    """A fine-tuning run (defaults after cirtorch, Radenović et al. TPAMI 2018, scaled for a CPU).

    Two defaults differ from cirtorch's, as measured on held-out Caltech-101 classes (benchmarks/RESULTS.md,
    "Fine-tuning on a CPU"): the ``ap`` loss, the only one that gained in a few minutes where contrastive
    lost 4 mAP points, and ``lr`` 1e-5, since a CPU run takes hundreds of steps rather than cirtorch's
    tens of thousands at 1e-6.

    ``data`` is a folder (class = sub-folder; with ``unlabelled``, every photo its own class) or a CSV of
    ``path,label`` rows. ``loss`` is a key of :data:`LOSSES`; ``margin`` None keeps the loss's own
    (contrastive 0.7, triplet and sos 0.1), ``sos_weight`` is λ of the sos loss, ``ap_bins`` the
    quantisation of the ap loss. Each epoch draws ``query_count`` queries (cirtorch: 2,000) and a pool of
    ``pool_size`` images (cirtorch: 20,000) to mine ``negatives`` hard negatives from, and trains on
    batches of ``batch_tuples`` tuples at ``imsize`` pixels on the long side. Adam with learning rate
    ``lr`` and ``weight_decay`` (GeM's p: ten times the rate, no decay, as cirtorch), the rate multiplied
    by ``exp(−lr_decay)`` after every epoch (cirtorch: 0.01). ``freeze`` is the number of backbone stages,
    input side first, left as they are. ``soa`` adds a second-order attention block, ``whiten_layer`` an
    end-to-end whitening layer initialised from learned whitening (PCA-whitening when ``unlabelled``).
    ``precision`` ``auto`` trains with bf16 autocast where the CPU has native bf16 and the loss agrees
    with fp32 on the first batches.
    """

    data: str
    backbone: str = DEFAULT_MODEL
    loss: str = "ap"
    margin: float | None = None
    sos_weight: float = 10.0
    ap_bins: int = AP_BINS
    negatives: int = DEFAULT_NEGATIVES
    query_count: int = 500
    pool_size: int = 2000
    epochs: int = 10
    imsize: int = 362
    lr: float = 1e-5
    weight_decay: float = 1e-6
    lr_decay: float = 0.01
    batch_tuples: int = 5
    freeze: int = 0
    soa: bool = False
    whiten_layer: bool = False
    unlabelled: bool = False
    augment_query: bool = True
    positives: str = "nearest"
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ConfigError(f"unknown loss {self.loss!r}; use one of {', '.join(LOSSES)}")
        if self.margin is not None and (self.loss == "ap" or not self.margin > 0):
            raise ConfigError(f"the {self.loss} loss takes no margin of {self.margin}")
        for name in ("negatives", "query_count", "pool_size", "epochs", "batch_tuples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.imsize < 32:
            raise ConfigError(f"imsize must be at least 32, got {self.imsize}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ConfigError(f"the learning rate must be positive, got {self.lr}")
        if self.weight_decay < 0 or self.lr_decay < 0 or self.freeze < 0:
            raise ConfigError("weight_decay, lr_decay and freeze cannot be negative")
        if self.positives not in POSITIVE_RULES:
            raise ConfigError(f"positives must be one of {', '.join(POSITIVE_RULES)}, got {self.positives!r}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        LOSSES[self.loss](self)  # the loss's own checks (a negative SOS weight, too few AP bins)

    def record(self) -> dict[str, Any]:
        """The settings as JSON-able values; :meth:`from_record` reads them back."""
        return dataclasses.asdict(self)

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> TrainSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(record) - known)
        if unknown:
            raise ConfigError(f"settings this version of lookalike does not know: {', '.join(unknown)}")
        return cls(**record)

    def differences(self, other: TrainSettings) -> list[str]:
        """``name: ours → theirs`` for every setting but ``epochs`` that differs in ``other``."""
        ours, theirs = self.record(), other.record()
        return [f"{k}: {ours[k]!r} → {theirs[k]!r}" for k in ours if k != "epochs" and ours[k] != theirs[k]]


def _margin(settings: TrainSettings) -> dict[str, float]:
    return {} if settings.margin is None else {"margin": settings.margin}


LOSSES: Mapping[str, Callable[[TrainSettings], Loss]] = MappingProxyType(
    {
        "contrastive": lambda s: ContrastiveLoss(**_margin(s)),
        "triplet": lambda s: TripletLoss(**_margin(s)),
        "ap": lambda s: ListwiseAPLoss(bins=s.ap_bins),
        "sos": lambda s: TripletSOSLoss(weight=s.sos_weight, **_margin(s)),
    }
)


def build_loss(settings: TrainSettings) -> Loss:
    """The loss module ``settings`` name, with its options."""
    return LOSSES[settings.loss](settings)


__all__ = ["LOSSES", "POSITIVE_RULES", "PRECISIONS", "TrainSettings", "build_loss"]
