"""Pooling against slow, obvious numpy loops and hand-computed R-MAC region lists."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lookalike.errors import ConfigError
from lookalike.pooling import (
    MAC,
    POOLINGS,
    RMAC,
    GeM,
    SPoC,
    build_pooling,
    centre_prior_weights,
    gem,
    mac,
    rmac,
    rmac_regions,
    spoc,
)


def feature_maps(n=3, c=5, h=7, w=9, seed=0) -> torch.Tensor:
    """Non-negative maps with ties-free values, like post-ReLU activations plus a few exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, c, h, w, generator=g, dtype=torch.float64) * 3
    return torch.where(x < 0.2, torch.zeros_like(x), x).float()


# ---- naive references: loops over positions and regions, float64 -------------------------------------


def naive_mac(x: np.ndarray) -> np.ndarray:
    n, c, h, w = x.shape
    out = np.full((n, c), -np.inf)
    for i in range(h):
        for j in range(w):
            out = np.maximum(out, x[:, :, i, j])
    return out


def naive_spoc(x: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    n, c, h, w = x.shape
    if weights is None:
        weights = np.full((h, w), 1.0 / (h * w))
    out = np.zeros((n, c))
    for i in range(h):
        for j in range(w):
            out += weights[i, j] * x[:, :, i, j]
    return out


def naive_centre_prior(h: int, w: int) -> np.ndarray:
    """Babenko & Lempitsky: Gaussian at the image centre, sigma a third of the centre-to-closest-edge distance."""
    sigma = (min(h, w) / 2) / 3
    out = np.zeros((h, w))
    for i in range(h):
        for j in range(w):
            y, x = i + 0.5, j + 0.5  # cell centres; the map spans [0, h] × [0, w]
            out[i, j] = math.exp(-((y - h / 2) ** 2 + (x - w / 2) ** 2) / (2 * sigma**2))
    return out / out.sum()


def naive_gem(x: np.ndarray, p: float, eps: float = 1e-6) -> np.ndarray:
    n, c, h, w = x.shape
    out = np.zeros((n, c))
    for i in range(h):
        for j in range(w):
            out += max_(x[:, :, i, j], eps) ** p
    return (out / (h * w)) ** (1 / p)


def max_(a: np.ndarray, floor: float) -> np.ndarray:
    return np.where(a < floor, floor, a)


def naive_rmac(x: np.ndarray, regions, include_global: bool, eps: float = 1e-6) -> np.ndarray:
    n, c, h, w = x.shape
    boxes = ([(0, 0, h, w)] if include_global else []) + list(regions)
    out = np.zeros((n, c))
    for top, left, bh, bw in boxes:
        for k in range(n):
            v = naive_mac(x[k : k + 1, :, top : top + bh, left : left + bw])[0]
            out[k] += v / (math.sqrt(sum(t * t for t in v)) + eps)
    return out


# ---- MAC, SPoC, GeM ------------------------------------------------------------------------------------


def test_mac_matches_loop_over_positions():
    x = feature_maps()
    np.testing.assert_allclose(mac(x).numpy(), naive_mac(x.double().numpy()), rtol=1e-6)


def test_spoc_matches_loop_over_positions():
    x = feature_maps()
    np.testing.assert_allclose(spoc(x).numpy(), naive_spoc(x.double().numpy()), rtol=1e-5)


@pytest.mark.parametrize(("h", "w"), [(7, 9), (6, 6), (1, 4), (10, 3)])
def test_spoc_centre_prior_matches_babenko_weights(h, w):
    x = feature_maps(h=h, w=w)
    weights = naive_centre_prior(h, w)
    np.testing.assert_allclose(centre_prior_weights(h, w).numpy(), weights, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(
        spoc(x, centre_prior=True).numpy(), naive_spoc(x.double().numpy(), weights), rtol=1e-5
    )


def test_spoc_centre_prior_sigma_changes_the_weighting():
    x = feature_maps()
    wide = spoc(x, centre_prior=True, sigma=1e4)
    torch.testing.assert_close(wide, spoc(x), rtol=1e-5, atol=1e-6)  # a very flat prior is the mean
    assert not torch.allclose(spoc(x, centre_prior=True, sigma=0.5), spoc(x))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, 4.5])
def test_gem_matches_loop_over_positions(p):
    x = feature_maps()
    np.testing.assert_allclose(gem(x, p).numpy(), naive_gem(x.double().numpy(), p), rtol=1e-5)


def test_gem_p1_is_the_mean_of_clamped_values():
    x = feature_maps().clamp(min=1e-6)
    torch.testing.assert_close(gem(x, 1.0), spoc(x), rtol=1e-6, atol=1e-7)


def test_gem_tends_to_max_as_p_grows():
    x = 0.5 + feature_maps() / 6  # in [0.5, 1]: x ** p stays finite for large p
    hw = x.shape[-2] * x.shape[-1]
    errors = []
    for p in (10.0, 50.0, 200.0):
        ratio = gem(x, p) / mac(x)
        # mean(x ** p) ≥ max ** p / HW bounds GeM from below; it never exceeds the max
        assert torch.all(ratio <= 1 + 1e-5)
        assert torch.all(ratio >= hw ** (-1 / p) - 1e-5)
        errors.append((1 - ratio).abs().max().item())
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] < 0.03


def test_gem_accepts_a_tensor_p():
    x = feature_maps()
    torch.testing.assert_close(gem(x, torch.tensor([2.5])), gem(x, 2.5))


def test_gem_clamps_below_eps():
    x = torch.zeros(1, 2, 3, 3)
    torch.testing.assert_close(gem(x, 3.0, eps=1e-2), torch.full((1, 2), 1e-2))


# ---- R-MAC regions ---------------------------------------------------------------------------------------


def boxes(size, tops, lefts):
    return [(t, s, size, size) for t in tops for s in lefts]


def test_rmac_regions_square_7x7():
    # square map: no extra regions on either side; level l has l × l regions of side floor(14 / (l + 1))
    expected = (
        boxes(7, [0], [0])  # l = 1: the whole map
        + boxes(4, [0, 3], [0, 3])  # l = 2: side 4, offsets k · (7 - 4) / 1
        + boxes(3, [0, 2, 4], [0, 2, 4])  # l = 3: side 3, offsets k · (7 - 3) / 2
    )
    assert rmac_regions(7, 7, 3) == expected


def test_rmac_regions_wide_10x20():
    # w = 10, long side 20. With s regions at level 1 the overlap is 1 - 10 / (10 (s - 1)):
    # s = 2 → 0, s = 3 → 0.5, s = 4 → 0.67 ...; 0.5 is closest to 0.4, so the long side gets 2 extra.
    expected = (
        boxes(10, [0], [0, 5, 10])  # l = 1: 1 × 3, offsets k · 10 / 2
        + boxes(6, [0, 4], [0, 4, 9, 14])  # l = 2: side 6; rows k · 4 / 1, columns floor(k · 14 / 3)
        + boxes(5, [0, 2, 5], [0, 3, 7, 11, 15])  # l = 3: side 5; floor(k · 5 / 2), floor(k · 15 / 4)
    )
    assert rmac_regions(10, 20, 3) == expected


def test_rmac_regions_tall_is_the_transpose_of_wide():
    wide = rmac_regions(10, 20, 3)
    tall = rmac_regions(20, 10, 3)
    assert sorted(tall) == sorted((left, top, w, h) for top, left, h, w in wide)


def test_rmac_regions_tie_goes_to_fewer_regions():
    # 10 × 18: s = 2 gives overlap 0.2 and s = 3 gives 0.6, equally far from 0.4; the smaller s is kept
    assert [r for r in rmac_regions(10, 18, 1)] == boxes(10, [0], [0, 8])


def test_rmac_regions_tiny_maps_drop_empty_regions():
    assert rmac_regions(1, 1, 3) == [(0, 0, 1, 1)]
    assert all(h > 0 and w > 0 for _, _, h, w in rmac_regions(2, 5, 5))


@pytest.mark.parametrize(("h", "w"), [(h, w) for h in (1, 2, 5, 13, 24, 32) for w in (1, 3, 7, 24, 41, 64)])
def test_rmac_regions_follow_the_rule(h, w):
    levels = 4
    regions = rmac_regions(h, w, levels)
    short, long = min(h, w), max(h, w)
    extras = set()
    done = 0
    for level in range(1, levels + 1):
        end = len(rmac_regions(h, w, level))  # regions come level by level
        cells, done = regions[done:end], end
        size = 2 * short // (level + 1)
        if size == 0:
            assert cells == []
            continue
        for top, left, rh, rw in cells:
            assert (rh, rw) == (size, size)
            assert 0 <= top <= h - rh and 0 <= left <= w - rw
        # level × (level + extra) regions, the extra ones along the long side, in row-major order;
        # offsets can repeat when a side has fewer cells than regions
        n_long, remainder = divmod(len(cells), level)
        assert remainder == 0
        extras.add(n_long - level)
        n_rows, n_cols = (n_long, level) if h > w else (level, n_long)
        tops, lefts = [c[0] for c in cells[::n_cols]], [c[1] for c in cells[:n_cols]]
        assert len(tops) == n_rows
        assert cells == boxes(size, tops, lefts)
        for starts, side in ((tops, h), (lefts, w)):
            assert starts[0] == 0
            if len(starts) > 1:
                assert starts[-1] + size == side  # regions reach both ends
                gaps = np.diff(starts)
                assert gaps.max() - gaps.min() <= 1  # evenly spread
    assert len(extras) == 1  # the long side's surplus is the same at every level
    (extra,) = extras
    if h == w:
        assert extra == 0
    else:
        overlaps = {s: 1 - (long - short) / ((s - 1) * short) for s in range(2, 8)}
        best = min(abs(o - 0.4) for o in overlaps.values())
        assert abs(overlaps[extra + 1] - 0.4) == pytest.approx(best)


def test_rmac_regions_rejects_bad_levels():
    with pytest.raises(ConfigError):
        rmac_regions(7, 7, 0)


# ---- R-MAC pooling ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("include_global", [True, False])
@pytest.mark.parametrize(("h", "w"), [(7, 7), (10, 20), (13, 6)])
def test_rmac_matches_loop_over_regions(h, w, include_global):
    x = feature_maps(h=h, w=w)
    expected = naive_rmac(x.double().numpy(), rmac_regions(h, w, 3), include_global)
    got = rmac(x, levels=3, include_global=include_global)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-5)


def test_rmac_single_level_on_square_map_is_twice_normalised_mac():
    # the only region is the whole map, which the global MAC repeats (as in cirtorch)
    x = feature_maps(h=6, w=6)
    expected = 2 * torch.nn.functional.normalize(mac(x), dim=1)
    torch.testing.assert_close(rmac(x, levels=1), expected, rtol=1e-5, atol=1e-6)


# ---- shared properties: batches, precision, modules, autograd, tracing -------------------------------------


ALL_POOLINGS = [
    pytest.param(MAC(), id="mac"),
    pytest.param(SPoC(), id="spoc"),
    pytest.param(SPoC(centre_prior=True), id="spoc-centre"),
    pytest.param(RMAC(), id="rmac"),
    pytest.param(GeM(), id="gem"),
    pytest.param(GeM(p=2.0, learnable=False), id="gem-fixed"),
]


@pytest.mark.parametrize("pool", ALL_POOLINGS)
def test_batch_is_the_stack_of_single_images(pool):
    x = feature_maps(n=4)
    batched = pool(x)
    assert batched.shape == (4, 5)
    singles = torch.cat([pool(x[i : i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, singles)


@pytest.mark.parametrize("pool", ALL_POOLINGS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_input_is_computed_in_float32(pool, dtype):
    x = feature_maps().to(dtype)
    out = pool(x)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, pool(x.float()), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pool", ALL_POOLINGS)
def test_modules_reject_inputs_that_are_not_feature_maps(pool):
    with pytest.raises(ConfigError):
        pool(torch.rand(2, 5, 7))


def test_gradients_reach_gem_p_and_the_input():
    pool = GeM(p=3.0)
    x = feature_maps().requires_grad_()
    pool(x).sum().backward()
    assert pool.p.grad is not None and pool.p.grad.shape == (1,)
    assert torch.isfinite(pool.p.grad).all() and pool.p.grad.abs().item() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_gradients_reach_gem_p_through_bfloat16_input():
    pool = GeM(p=3.0)
    pool(feature_maps().bfloat16()).sum().backward()
    assert pool.p.grad is not None and torch.isfinite(pool.p.grad).all()


def test_gem_state_dict_is_cirtorch_compatible():
    checkpoint = {"pool.p": torch.tensor([2.7])}
    for learnable in (True, False):
        pool = GeM(learnable=learnable)
        pool.load_state_dict({"p": checkpoint["pool.p"]})
        assert pool.p.shape == (1,)
        assert pool.p.item() == pytest.approx(2.7)
    assert isinstance(GeM().p, torch.nn.Parameter)
    assert not isinstance(GeM(learnable=False).p, torch.nn.Parameter)
    assert [name for name, _ in GeM(learnable=False).named_parameters()] == []


def test_reprs_show_the_settings():
    assert repr(GeM(p=3.0)) == "GeM(p=3.0000, eps=1e-06, learnable=True)"
    assert "levels=3" in repr(RMAC())
    assert "centre_prior=True" in repr(SPoC(centre_prior=True))


@pytest.mark.parametrize("pool", ALL_POOLINGS)
def test_modules_compile_without_graph_breaks(pool):
    compiled = torch.compile(pool, backend="eager", fullgraph=True)
    for seed, h, w in ((0, 7, 9), (1, 7, 9), (2, 10, 20)):
        x = feature_maps(h=h, w=w, seed=seed)
        torch.testing.assert_close(compiled(x), pool(x))


@pytest.mark.parametrize("pool", ALL_POOLINGS)
def test_modules_export(pool):
    x = feature_maps()
    exported = torch.export.export(pool, (x,))
    torch.testing.assert_close(exported.module()(feature_maps(seed=1)), pool(feature_maps(seed=1)))


# ---- factory ---------------------------------------------------------------------------------------------


def test_build_pooling_builds_every_name():
    assert set(POOLINGS) == {"mac", "spoc", "spoc-centre", "rmac", "gem"}
    assert isinstance(build_pooling("mac"), MAC)
    assert build_pooling("spoc-centre").centre_prior
    assert not build_pooling("spoc").centre_prior
    assert build_pooling("rmac", levels=2).levels == 2
    gem_module = build_pooling("gem", p=2.0, learnable=False)
    assert isinstance(gem_module, GeM) and not gem_module.learnable and gem_module.p.item() == 2.0


def test_build_pooling_rejects_unknown_names_and_foreign_options():
    with pytest.raises(ConfigError, match="unknown pooling"):
        build_pooling("vlad")
    with pytest.raises(ConfigError, match="does not take p"):
        build_pooling("mac", p=3.0)
    with pytest.raises(ConfigError):
        build_pooling("spoc", sigma=2.0)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_gem_rejects_non_positive_p(bad):
    with pytest.raises(ConfigError):
        GeM(p=bad)
    with pytest.raises(ConfigError):
        gem(feature_maps(), bad)
