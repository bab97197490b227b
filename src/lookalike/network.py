"""The descriptor network (backbone → pooling → optional end-to-end whitening → L2) and its fast CPU form."""

from __future__ import annotations

import copy
import logging
from typing import Literal

import torch
from torch import nn

from lookalike.attention import AttentiveBackbone, with_attention
from lookalike.backbones import Backbone, build_backbone
from lookalike.converters import StateDict
from lookalike.errors import ConfigError, WeightsError
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


HEAD_PREFIXES = ("attention.", "pool.", "whiten.", "lw_")


def build_descriptor_net(config: ModelConfig, pooling: str, gem_p: float | None = None) -> DescriptorNet:
    """The network of ``config`` with pretrained weights (pulled into the cache when needed)."""
    return descriptor_net_from_state(config, load_weights(config), pooling, gem_p)


def descriptor_net_from_state(
    config: ModelConfig, state: StateDict, pooling: str, gem_p: float | None = None
) -> DescriptorNet:
    """The network of ``config`` from tensors in the cirtorch-like layout: backbone keys as they are,
    ``attention.*`` for the second-order attention block (when ``config.attention``; its reduction read
    from the tensors' shapes), ``pool.p`` a trained GeM exponent, ``whiten.weight`` / ``whiten.bias`` the
    end-to-end whitening layer (when ``config.learned_whitening``)."""
    backbone = build_backbone(config.arch)
    backbone_state = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES)}
    if not config.has_classifier:
        backbone.fc = None  # type: ignore[assignment]
    load_into(backbone, backbone_state, config.name)
    features: Backbone = backbone
    attention = {k.removeprefix("attention."): v for k, v in state.items() if k.startswith("attention.")}
    if config.attention != bool(attention):
        has = "has" if attention else "has no"
        raise WeightsError(
            f"{config.name}: the weights {has} attention.* tensors; the registry says otherwise"
        )
    if attention:
        features = with_attention(
            backbone, _attention_reduction(attention, backbone.out_channels, config.name)
        )
        load_into(features.attention, attention, config.name)
    p = (gem_p if gem_p is not None else config.gem_p) if pooling == "gem" else None
    if pooling == "gem" and gem_p is None and "pool.p" in state:
        p = float(state["pool.p"].reshape(-1)[0])
    pool = build_pooling(pooling, p=p)
    whiten = None
    if config.learned_whitening:
        weight = state["whiten.weight"]
        whiten = nn.Linear(weight.shape[1], weight.shape[0])
        whiten.load_state_dict({"weight": weight, "bias": state["whiten.bias"]})
    return DescriptorNet(features, pool, whiten).eval()


def _attention_reduction(state: StateDict, channels: int, what: str) -> int:
    reduced = state.get("h.weight")
    if reduced is None or reduced.dim() != 4 or reduced.shape[0] < 1 or channels % reduced.shape[0]:
        raise WeightsError(f"{what}: attention.h.weight does not fit a backbone of {channels} channels")
    return channels // reduced.shape[0]


def _parts(net: DescriptorNet) -> dict[str, nn.Module]:
    """``net``'s modules by the key prefix of their tensors in the layout below."""
    features = net.features
    parts: dict[str, nn.Module] = (
        {"": features.backbone, "attention.": features.attention}
        if isinstance(features, AttentiveBackbone)
        else {"": features}
    )
    parts["pool."] = net.pool
    if net.whiten is not None:
        parts["whiten."] = net.whiten
    return parts


def descriptor_state(net: DescriptorNet) -> StateDict:
    """The tensors of ``net`` (copies) in the layout :func:`descriptor_net_from_state` reads: the
    backbone's own keys, ``attention.*``, ``pool.p`` for GeM, ``whiten.weight`` / ``whiten.bias``."""
    return {
        prefix + key: value.detach().clone().contiguous()
        for prefix, module in _parts(net).items()
        for key, value in module.state_dict().items()
    }


def load_descriptor_state(net: DescriptorNet, state: StateDict) -> None:
    """Load tensors of :func:`descriptor_state`'s layout into ``net``, which must have the same parts:
    every tensor must fit, and none may be left over (only BatchNorm counters may be absent)."""
    parts = _parts(net)
    split: dict[str, StateDict] = {prefix: {} for prefix in parts}
    for key, value in state.items():
        prefix = next((p for p in parts if p and key.startswith(p)), "")
        split[prefix][key.removeprefix(prefix)] = value
    for prefix, module in parts.items():
        load_into(module, split[prefix], f"descriptor network ({prefix.rstrip('.') or 'backbone'})")


def fold_batchnorm(backbone: nn.Module) -> nn.Module:
    """A copy with inference BatchNorm folded into the preceding convolutions (torch.fx) where traceable.

    A module fx cannot trace as a whole (data-dependent control flow, as in the second-order attention
    block) is folded child by child, so a traceable backbone under an attention block is still folded,
    and so are the block's own convolution + BatchNorm embeddings. Always a copy: the caller converts it
    to bf16 / channels-last without touching ``backbone``.
    """
    copied = _fold(copy.deepcopy(backbone))
    left = sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in copied.modules())
    if left:
        log.info("batch-norm folding left %d batch norms of %s in place", left, type(backbone).__name__)
    return copied


def _fold(module: nn.Module) -> nn.Module:
    from torch.fx.experimental.optimization import fuse

    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules()):
        return module
    try:
        return fuse(module, inplace=True)
    except Exception:  # fx tracing fails on data-dependent control flow; fusing is an optimisation
        for name, child in list(module.named_children()):
            setattr(module, name, _fold(child))
        return module


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
        return self.head(self.feature_map(x))

    @torch.inference_mode()
    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's output for ``(N, 3, H, W)`` inputs, in the network's precision."""
        return self.features(x.to(self.dtype).contiguous(memory_format=torch.channels_last))

    @torch.inference_mode()
    def head(self, fmap: torch.Tensor, pool: nn.Module | None = None) -> torch.Tensor:
        """``(N, D)`` descriptors of a feature map with the network's pooling, or with ``pool`` instead:
        every pooling can be read from one backbone pass."""
        return descriptor_head(fmap, self.pool if pool is None else pool, self.whiten)
