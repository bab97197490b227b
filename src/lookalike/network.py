"""The descriptor network (backbone → pooling → optional end-to-end whitening → L2) and its fast CPU form."""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
from torch import nn

from lookalike.backbones import Backbone, build_backbone
from lookalike.errors import ConfigError
from lookalike.pooling import build_pooling
from lookalike.registry import ModelConfig
from lookalike.weights import load_into, load_weights

log = logging.getLogger(__name__)

Precision = Literal["fp32", "bf16"]


class DescriptorNet(nn.Module):
    """Image batch ``(N, 3, H, W)`` → L2-normalised global descriptors ``(N, D)`` float32.

    Pooling always runs in float32 on the feature map, whatever precision the backbone uses.
    """

    def __init__(self, backbone: Backbone, pooling: nn.Module, whiten: nn.Linear | None = None) -> None:
        super().__init__()
        self.features = backbone
        self.pool = pooling
        self.whiten = whiten

    @property
    def dim(self) -> int:
        return self.whiten.out_features if self.whiten is not None else self.features.out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return descriptor_head(self.features(x), self.pool, self.whiten)


def descriptor_head(fmap: torch.Tensor, pool: nn.Module, whiten: nn.Module | None) -> torch.Tensor:
    """Feature map → float32 pooling → L2 (→ whitening layer → L2)."""
    vectors = nn.functional.normalize(pool(fmap.float()), dim=-1)
    if whiten is not None:
        vectors = nn.functional.normalize(whiten(vectors), dim=-1)
    return vectors


def build_descriptor_net(config: ModelConfig, pooling: str, gem_p: float | None = None) -> DescriptorNet:
    """The network of ``config`` with pretrained weights (pulled into the cache when needed)."""
    state = load_weights(config)
    backbone = build_backbone(config.arch)
    head_keys = ("pool.", "whiten.", "lw_")
    backbone_state = {k: v for k, v in state.items() if not k.startswith(head_keys)}
    if not config.has_classifier:
        backbone.fc = None  # type: ignore[assignment]
    load_into(backbone, backbone_state, config.name)
    p = (gem_p if gem_p is not None else config.gem_p) if pooling == "gem" else None
    if pooling == "gem" and gem_p is None and "pool.p" in state:
        p = float(state["pool.p"].reshape(-1)[0])
    pool = build_pooling(pooling, p=p)
    whiten = None
    if config.learned_whitening:
        weight = state["whiten.weight"]
        whiten = nn.Linear(weight.shape[1], weight.shape[0])
        whiten.load_state_dict({"weight": weight, "bias": state["whiten.bias"]})
    return DescriptorNet(backbone, pool, whiten).eval()


def fold_batchnorm(backbone: nn.Module) -> nn.Module:
    """A copy with inference BatchNorm folded into the preceding convolutions (torch.fx) where traceable.

    Always a copy: the caller converts it to bf16 / channels-last without touching ``backbone``.
    """
    from torch.fx.experimental.optimization import fuse

    copied = copy.deepcopy(backbone)
    try:
        return fuse(copied)
    except Exception as exc:  # fx tracing fails on data-dependent control flow; fusing is an optimisation
        log.info("batch-norm folding skipped for %s: %s", type(backbone).__name__, exc)
        return copied


class InferenceNet(nn.Module):
    """The descriptor network prepared for CPU inference: folded BN, channels-last, fp32 or bf16 weights."""

    def __init__(self, net: DescriptorNet, precision: Precision) -> None:
        super().__init__()
        if precision not in ("fp32", "bf16"):
            raise ConfigError(f"unknown precision {precision!r}; use fp32 or bf16")
        self.precision = precision
        self.dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        backbone = fold_batchnorm(net.features).to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        self.features = backbone.to(self.dtype)
        self.pool = net.pool
        self.whiten = net.whiten

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype).contiguous(memory_format=torch.channels_last)
        return descriptor_head(self.features(x), self.pool, self.whiten)
