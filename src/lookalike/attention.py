"""SOLAR's second-order attention (Ng et al., ECCV 2020) on a backbone's last feature map.

Each spatial position attends to every other through the second-order map ``f_i · g_j`` of two embeddings
of the feature map, a non-local block: ``z_i = x_i + V Σ_j softmax_j(f_i · g_j / √c) h_j``. ``f``, ``g`` and
``h`` are 1×1 convolutions to ``c = C / reduction`` channels (``f`` and ``g`` followed by batch norm and
ReLU, as in SOLAR), ``V`` a 1×1 convolution back to ``C``. ``V`` starts at zero, weights and bias, so an
untrained block is exactly the identity and a pretrained network keeps its descriptors until training moves
``V``; at that point only ``V`` has a gradient, the others follow once it is non-zero. (SOLAR also holds an
unused ``gamma``; a second zero factor would leave every gradient zero, so there is none here.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lookalike.backbones.base import Backbone
from lookalike.errors import ConfigError


def second_order_attention(f: Tensor, g: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
    """The attended values and the attention: ``f``, ``g``, ``h`` ``(B, c, H, W)`` → ``(B, c, H, W)`` and
    ``(B, HW, HW)``, where row ``i`` of the attention is ``softmax_j(f_i · g_j / √c)`` over positions ``j``
    (row-major) and output position ``i`` is ``Σ_j attention_ij h_j``."""
    b, c, height, width = f.shape
    queries = f.reshape(b, c, height * width)
    keys = g.reshape(b, c, height * width)
    values = h.reshape(b, c, height * width)
    attention = torch.softmax(queries.transpose(1, 2) @ keys * c**-0.5, dim=-1)
    attended = values @ attention.transpose(1, 2)
    return attended.reshape(b, c, height, width), attention


def _conv1x1(channels: int, out: int, zero: bool = False) -> nn.Conv2d:
    """A 1×1 convolution, Kaiming-initialised as in SOLAR (or all zero), bias zero."""
    conv = nn.Conv2d(channels, out, 1)
    if zero:
        nn.init.zeros_(conv.weight)
    else:
        nn.init.kaiming_normal_(conv.weight)
    if conv.bias is not None:
        nn.init.zeros_(conv.bias)
    return conv


def _embedding(channels: int, reduced: int) -> nn.Sequential:
    return nn.Sequential(_conv1x1(channels, reduced), nn.BatchNorm2d(reduced), nn.ReLU())


class SecondOrderAttention(nn.Module):
    """The SOA block: feature map ``(B, C, H, W)`` → the same shape, identity until trained.

    ``reduction`` divides the channels of the query, key and value embeddings (SOLAR: 2 after ResNet's
    last block, 4 after the one before).
    """

    def __init__(self, channels: int, reduction: int = 2) -> None:
        super().__init__()
        if channels < 1 or reduction < 1 or channels % reduction:
            raise ConfigError(f"{channels} channels do not divide into a reduction of {reduction}")
        reduced = channels // reduction
        self.channels = channels
        self.reduction = reduction
        self.f = _embedding(channels, reduced)
        self.g = _embedding(channels, reduced)
        self.h = _conv1x1(channels, reduced)
        self.v = _conv1x1(reduced, channels, zero=True)

    def attention(self, x: Tensor) -> Tensor:
        """The attention ``(B, HW, HW)`` of :func:`second_order_attention`, for inspection."""
        return second_order_attention(self.f(x), self.g(x), self.h(x))[1]

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[1] != self.channels:
            raise ConfigError(
                f"attention expects maps (B, {self.channels}, H, W), got shape {tuple(x.shape)}"
            )
        attended, _ = second_order_attention(self.f(x), self.g(x), self.h(x))
        return x + self.v(attended)

    def extra_repr(self) -> str:
        return f"channels={self.channels}, reduction={self.reduction}"


class AttentiveBackbone(Backbone):
    """A backbone followed by a :class:`SecondOrderAttention` block on its feature map.

    Switching attention on is wrapping the backbone (:func:`with_attention`); the feature map keeps its
    shape, so pooling and whitening are unchanged. ``classify`` is the wrapped backbone's.
    """

    def __init__(self, backbone: Backbone, attention: SecondOrderAttention) -> None:
        super().__init__()
        if attention.channels != backbone.out_channels:
            raise ConfigError(
                f"attention over {attention.channels} channels on a backbone of {backbone.out_channels}"
            )
        self.backbone = backbone
        self.attention = attention
        self.out_channels = backbone.out_channels

    def forward(self, x: Tensor) -> Tensor:
        return self.attention(self.backbone(x))

    def classify(self, fmap: Tensor) -> Tensor:
        return self.backbone.classify(fmap)


def with_attention(backbone: Backbone, reduction: int = 2) -> AttentiveBackbone:
    """``backbone`` with a fresh, identity-initialised SOA block on its last feature map."""
    return AttentiveBackbone(backbone, SecondOrderAttention(backbone.out_channels, reduction))


__all__ = ["AttentiveBackbone", "SecondOrderAttention", "second_order_attention", "with_attention"]
