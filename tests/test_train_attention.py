"""Second-order attention: identity at initialisation, a naive per-position loop, gradients, the wrapper."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from lookalike.attention import AttentiveBackbone, SecondOrderAttention, with_attention
from lookalike.backbones.base import Backbone
from lookalike.errors import ConfigError


def maps(b=2, c=8, h=3, w=4, seed=0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed)).relu()


def randomised(block: SecondOrderAttention, seed: int = 1) -> SecondOrderAttention:
    """Every parameter and batch-norm statistic random, so the loop below checks all of them."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        for bn in (block.f[1], block.g[1]):
            bn.running_mean.copy_(torch.randn(bn.running_mean.shape, generator=g))
            bn.running_var.copy_(torch.rand(bn.running_var.shape, generator=g) + 0.5)
    return block.eval()


def conv1x1(conv: nn.Conv2d, vector: list[float]) -> list[float]:
    w, b = conv.weight[:, :, 0, 0].tolist(), conv.bias.tolist()
    return [
        sum(wi * xi for wi, xi in zip(row, vector, strict=True)) + bias
        for row, bias in zip(w, b, strict=True)
    ]


def embed(seq: nn.Sequential, vector: list[float]) -> list[float]:
    conv, bn = seq[0], seq[1]
    out = []
    for k, y in enumerate(conv1x1(conv, vector)):
        y = (y - bn.running_mean[k].item()) / math.sqrt(bn.running_var[k].item() + bn.eps)
        out.append(max(0.0, y * bn.weight[k].item() + bn.bias[k].item()))
    return out


def naive_soa(block: SecondOrderAttention, x: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(x, dtype=torch.float64)
    b, c, height, width = x.shape
    positions = [(i, j) for i in range(height) for j in range(width)]
    for n in range(b):
        vectors = {pos: x[n, :, pos[0], pos[1]].tolist() for pos in positions}
        f = {pos: embed(block.f, v) for pos, v in vectors.items()}
        g = {pos: embed(block.g, v) for pos, v in vectors.items()}
        h = {pos: conv1x1(block.h, v) for pos, v in vectors.items()}
        reduced = len(h[positions[0]])
        for pos in positions:
            logits = [
                sum(a * b for a, b in zip(f[pos], g[o], strict=True)) / math.sqrt(reduced) for o in positions
            ]
            top = max(logits)
            weights = [math.exp(v - top) for v in logits]
            total = sum(weights)
            mixed = [
                sum(w / total * h[o][k] for w, o in zip(weights, positions, strict=True))
                for k in range(reduced)
            ]
            projected = conv1x1(block.v, mixed)
            for k in range(c):
                out[n, k, pos[0], pos[1]] = vectors[pos][k] + projected[k]
    return out


def test_untrained_block_is_the_identity():
    block = SecondOrderAttention(8)
    x = maps()
    assert torch.equal(block(x), x)
    assert torch.equal(block.eval()(x), x)


def test_shape_is_preserved_and_attention_rows_are_distributions():
    block = randomised(SecondOrderAttention(8, reduction=4))
    x = maps(b=3, h=5, w=2)
    assert block(x).shape == x.shape
    attention = block.attention(x)
    assert attention.shape == (3, 10, 10)
    assert torch.allclose(attention.sum(dim=-1), torch.ones(3, 10))


@pytest.mark.parametrize("reduction", [1, 2, 4])
def test_equals_a_naive_per_position_loop(reduction):
    block = randomised(SecondOrderAttention(8, reduction))
    x = maps(seed=2)
    with torch.no_grad():
        got = block(x)
    assert torch.allclose(got.double(), naive_soa(block, x), atol=1e-5)


def test_gradients_reach_the_projection_at_init_and_every_parameter_once_it_moved():
    block = SecondOrderAttention(8)
    block(maps()).square().sum().backward()
    assert block.v.weight.grad is not None and block.v.weight.grad.abs().sum() > 0
    block.zero_grad()
    with torch.no_grad():
        block.v.weight.normal_(0, 0.1, generator=torch.Generator().manual_seed(3))
    x = maps().requires_grad_(True)
    block(x).square().sum().backward()
    for name, p in block.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad is not None and torch.isfinite(x.grad).all()


class TinyBackbone(Backbone):
    out_channels = 8

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).relu()


def test_with_attention_keeps_the_backbone_output_until_trained():
    torch.manual_seed(0)
    backbone = TinyBackbone()
    wrapped = with_attention(backbone)
    images = torch.rand(2, 3, 32, 32)
    assert isinstance(wrapped, AttentiveBackbone) and wrapped.out_channels == 8
    assert torch.equal(wrapped(images), backbone(images))
    with pytest.raises(ConfigError, match="no classifier"):
        wrapped.classify(wrapped(images))


def test_channel_mismatches_are_refused():
    with pytest.raises(ConfigError):
        SecondOrderAttention(6, reduction=4)
    with pytest.raises(ConfigError):
        AttentiveBackbone(TinyBackbone(), SecondOrderAttention(4))
    with pytest.raises(ConfigError):
        SecondOrderAttention(8)(torch.zeros(1, 4, 2, 2))
