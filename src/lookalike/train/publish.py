"""A trained network as a local registry entry: ``$LOOKALIKE_HOME/models/NAME/model.json`` and
``weights.safetensors``, written as a crash-safe pair (:func:`lookalike.train.checkpoint.commit_pair`), so
``-m NAME`` loads it through the ordinary weights path (a ``file:`` source, sha256 verified)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from lookalike.attention import AttentiveBackbone
from lookalike.errors import CheckpointError, LocalModelError
from lookalike.network import DescriptorNet, descriptor_state
from lookalike.registry import (
    LOCAL_WEIGHTS_FORMAT,
    MODEL_FILE,
    ModelConfig,
    WeightSource,
    local_model_record,
    read_local_model,
)
from lookalike.train.checkpoint import commit_pair, settle_pair
from lookalike.train.describe import base_backbone
from lookalike.train.heads import LearnableGeM
from lookalike.train.settings import TrainSettings
from lookalike.weights import cache_path

WEIGHTS_FILE: Final = "weights.safetensors"


def describe_training(base: ModelConfig, settings: TrainSettings, epoch: int) -> str:
    """``fine-tuned from BASE with LOSS on DATA, epoch N`` (and what was added to the network)."""
    extras = [
        part
        for part, on in (
            ("SOA", settings.soa),
            ("whitening layer", settings.whiten_layer),
            ("unlabelled", settings.unlabelled),
        )
        if on
    ]
    added = f" (+{', +'.join(extras)})" if extras else ""
    return f"fine-tuned from {base.name} with {settings.loss}{added} on {settings.data}, epoch {epoch}"


def publish_model(
    folder: Path,
    net: DescriptorNet,
    base: ModelConfig,
    settings: TrainSettings,
    epoch: int,
    last_epoch: dict[str, Any] | None = None,
) -> ModelConfig:
    """Publish ``net`` as the local model of ``folder`` (named after it), replacing any earlier epoch's;
    GeM's p as inference uses it (floored as in training). The registry entry, as read back."""
    name = folder.name
    state = descriptor_state(net)
    if isinstance(net.pool, LearnableGeM):
        state["pool.p"] = state["pool.p"].clamp(min=net.pool.p_min)
    gem_p = float(state["pool.p"].reshape(-1)[0]) if "pool.p" in state else base.gem_p

    def config(sha256: str) -> ModelConfig:
        return ModelConfig(
            name=name,
            arch=base.arch,
            weights_format=LOCAL_WEIGHTS_FORMAT,
            preprocess=base.preprocess,
            feature_dim=base_backbone(net).out_channels,
            licence=base.licence,
            sources=(WeightSource("url", (folder / WEIGHTS_FILE).absolute().as_uri(), sha256),),
            description=describe_training(base, settings, epoch),
            imsize=base.imsize,
            has_classifier=False,
            pooling="gem",
            gem_p=gem_p,
            learned_whitening=net.whiten is not None,
            attention=isinstance(net.features, AttentiveBackbone),
        )

    training = {"epoch": epoch, "settings": settings.record(), "last_epoch": last_epoch}
    metadata = {"model": name, "epoch": str(epoch)}
    sha256 = commit_pair(
        folder,
        WEIGHTS_FILE,
        MODEL_FILE,
        state,
        metadata,
        lambda sha: local_model_record(config(sha), base.name, training),
    )
    cache_path(config(sha256)).unlink(missing_ok=True)  # the cached copy of an earlier epoch
    return read_local_model(folder)


def published_epoch(folder: Path) -> int | None:
    """The epoch of the model published in ``folder`` after settling what a crash left, or None when
    there is none or it cannot be read (then it is published again)."""
    try:
        record = json.loads((folder / MODEL_FILE).read_text(encoding="utf-8"))
        settle_pair(folder, WEIGHTS_FILE, record["weights"]["sha256"])
        read_local_model(folder)
        return int(record["training"]["epoch"])
    except (OSError, ValueError, KeyError, TypeError, CheckpointError, LocalModelError):
        return None


__all__ = ["WEIGHTS_FILE", "describe_training", "publish_model", "published_epoch"]
