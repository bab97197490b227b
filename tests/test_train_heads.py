"""Trainable heads: learnable GeM against pooling.gem, the whitening layer against Whitening.apply."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lookalike.backbones.base import Backbone
from lookalike.errors import ConfigError
from lookalike.network import DescriptorNet, descriptor_head
from lookalike.pooling import GeM, gem
from lookalike.train.heads import LearnableGeM, WhiteningLayer
from lookalike.whitening import fit_learned_whitening, fit_pca_whitening


def feature_maps(seed: int = 0) -> torch.Tensor:
    x = torch.rand(3, 6, 5, 4, generator=torch.Generator().manual_seed(seed)) * 2
    return torch.where(x < 0.3, torch.zeros_like(x), x)


def descriptors(n: int, d: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.abs(rng.standard_normal((n, d)) * np.geomspace(3, 0.3, d) + 0.5)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("p", [1.0, 2.5, 3.0, 6.0])
def test_learnable_gem_equals_pooling_gem_at_fixed_p(p):
    x = feature_maps()
    with torch.no_grad():
        assert torch.equal(LearnableGeM(p)(x), gem(x, p=torch.tensor([p])))
        assert torch.equal(LearnableGeM(p, eps=1e-3)(x), gem(x, p=torch.tensor([p]), eps=1e-3))
        torch.testing.assert_close(LearnableGeM(p)(x), gem(x, p=p), rtol=1e-6, atol=0)


def test_learnable_gem_p_gets_the_gradient_of_gem():
    x = feature_maps(1)
    pool = LearnableGeM(3.0)
    assert isinstance(pool.p, nn.Parameter) and pool.p.shape == (1,)
    pool(x).sum().backward()
    assert pool.p.grad is not None
    step = 1e-3
    numeric = (gem(x.double(), p=3.0 + step).sum() - gem(x.double(), p=3.0 - step).sum()) / (2 * step)
    assert pool.p.grad.item() == pytest.approx(numeric.item(), rel=1e-3)


def test_learnable_gem_is_floored_at_p_min():
    x = feature_maps(2)
    pool = LearnableGeM(3.0, p_min=1.5)
    with torch.no_grad():
        pool.p.fill_(0.2)
    assert torch.equal(pool(x), gem(x, p=torch.tensor([1.5])))
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.item() == 0.0
    with pytest.raises(ConfigError):
        LearnableGeM(0.5, p_min=1.0)


def test_learnable_gem_state_loads_into_the_inference_gem():
    trained = LearnableGeM(3.0)
    with torch.no_grad():
        trained.p.fill_(2.7)
    inference = GeM(3.0, learnable=False)
    inference.load_state_dict(trained.state_dict())
    x = feature_maps(3)
    assert torch.equal(inference(x), trained(x))


@pytest.mark.parametrize("kind", ["learned", "pca"])
def test_whitening_layer_reproduces_whitening_apply(kind):
    x = descriptors(400, 12, seed=4)
    if kind == "learned":
        pairs = np.stack([np.arange(0, 400, 2), np.arange(1, 400, 2)], axis=1)
        whitening = fit_learned_whitening(x, pairs, dim=8)
    else:
        whitening = fit_pca_whitening(x, dim=8)
    layer = WhiteningLayer(whitening)
    assert (layer.in_features, layer.out_features) == (12, 8)
    test = descriptors(50, 12, seed=5)
    with torch.no_grad():
        got = nn.functional.normalize(layer(torch.from_numpy(test)), dim=-1).numpy()
    np.testing.assert_allclose(got, whitening.apply(test), atol=1e-5)


class FlatBackbone(Backbone):
    out_channels = 12

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_whitening_layer_in_the_descriptor_head_and_network():
    whitening = fit_pca_whitening(descriptors(300, 12, seed=6), dim=5)
    layer = WhiteningLayer(whitening)
    pool = LearnableGeM(3.0)
    fmap = torch.rand(4, 12, 3, 3, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        pooled = nn.functional.normalize(gem(fmap, 3.0), dim=-1).numpy()
        head = descriptor_head(fmap, pool, layer).numpy()
        net = DescriptorNet(FlatBackbone(), pool, layer)
        assert net.dim == 5
        np.testing.assert_allclose(net(fmap).numpy(), head)
    np.testing.assert_allclose(head, whitening.apply(pooled), atol=1e-5)
    plain = nn.Linear(12, 5)
    plain.load_state_dict(layer.state_dict())
    assert torch.equal(plain.weight, layer.weight) and torch.equal(plain.bias, layer.bias)


def test_whitening_layer_trains():
    layer = WhiteningLayer(fit_pca_whitening(descriptors(100, 6, seed=8), dim=4))
    out = nn.functional.normalize(layer(torch.from_numpy(descriptors(5, 6, seed=9))), dim=-1)
    out[:, 0].sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    assert layer.bias.grad is not None
