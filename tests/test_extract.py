"""Descriptor extraction: multi-scale maths, batching, cropping, precision, bad files; against naive paths."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.cpu import cpu_info
from lookalike.extract import (
    MULTI_SCALES,
    DescriptorSettings,
    Extractor,
    combine_scales,
    scale_combination_power,
)
from lookalike.images import load_image
from lookalike.network import build_descriptor_net
from lookalike.precision import rankings_agree, resolve_precision
from lookalike.registry import get_model_config
from lookalike.transforms import to_tensor
from tests.conftest import require_weights, unit_rows


def naive_combine(vectors: np.ndarray, p: float) -> np.ndarray:
    dim = vectors.shape[1]
    out = np.zeros(dim)
    for d in range(dim):
        out[d] = (sum(float(v[d]) ** p for v in vectors) / len(vectors)) ** (1 / p)
    return out / math.sqrt(sum(x * x for x in out))


@pytest.mark.parametrize("p", [1.0, 3.0, 2.2])
def test_scale_combination_is_a_generalised_mean_then_l2(p) -> None:
    vectors = np.abs(unit_rows(3, 16, seed=1))
    np.testing.assert_allclose(combine_scales(vectors, p), naive_combine(vectors, p), atol=1e-6)


def test_single_scale_is_returned_unchanged() -> None:
    vector = unit_rows(1, 8)
    np.testing.assert_array_equal(combine_scales(vector, 3.0), vector[0])


def test_scale_power_follows_cirtorch() -> None:
    assert scale_combination_power("gem", 2.9, has_whiten_layer=False) == 2.9
    assert scale_combination_power("gem", 2.9, has_whiten_layer=True) == 1.0
    assert scale_combination_power("mac", 1.0, has_whiten_layer=False) == 1.0


def test_rankings_agree_ignores_ties_but_not_swaps() -> None:
    reference = np.array([[1.0, 0.9, 0.5, 0.4999]])
    assert rankings_agree(reference, np.array([[1.0, 0.9, 0.4998, 0.4999]]))
    assert not rankings_agree(reference, np.array([[1.0, 0.5, 0.9, 0.4999]]))


def test_pooling_defaults_to_the_models_own() -> None:
    from lookalike.errors import UnknownModelError
    from lookalike.registry import DEFAULT_MODEL, get_model_config

    assert DescriptorSettings().pooling == get_model_config(DEFAULT_MODEL).pooling == "rmac"
    assert DescriptorSettings(model="resnet101-gem.sfm120k").pooling == "gem"  # trained with GeM
    assert DescriptorSettings(pooling="mac").pooling == "mac"
    assert DescriptorSettings(pooling=None) == DescriptorSettings(pooling="rmac")
    with pytest.raises(UnknownModelError):
        DescriptorSettings(model="no-such-model")


def test_settings_reject_nonsense() -> None:
    from lookalike.errors import ConfigError

    for bad in ({"imsize": 0}, {"scales": ()}, {"scales": (1.0, -1.0)}, {"precision": "fp8"}):
        with pytest.raises(ConfigError):
            DescriptorSettings(**bad)


@pytest.fixture(scope="module")
def extractor(resnet50_extractor) -> Extractor:
    return resnet50_extractor


def naive_descriptor(image: Image.Image, imsize: int) -> np.ndarray:
    """cirtorch's path written out: eager fp32 backbone, GeM p=3 by hand, L2."""
    config = get_model_config("resnet50.keras-imagenet")
    net = build_descriptor_net(config, "gem")
    picture = image.copy()
    picture.thumbnail((imsize, imsize), Image.Resampling.LANCZOS)
    with torch.no_grad():
        fmap = net.features(to_tensor(picture, config.preprocess)[None])[0].double()
    pooled = fmap.clamp(min=1e-6).pow(3).mean(dim=(1, 2)).pow(1 / 3)
    return (pooled / pooled.norm()).numpy()


@pytest.mark.weights
def test_descriptor_equals_the_naive_pipeline(extractor, real_photos) -> None:
    for path in real_photos[:3]:
        image = load_image(path)
        ours = extractor.describe(image)
        assert ours.dtype == np.float32 and ours.shape == (2048,)
        assert np.linalg.norm(ours) == pytest.approx(1.0, abs=1e-5)
        np.testing.assert_allclose(ours, naive_descriptor(image, 256), atol=1e-4)


@pytest.mark.weights
def test_batched_equals_one_by_one(extractor, real_photos) -> None:
    images = [load_image(p) for p in real_photos]
    same_size = [images[0], images[0].transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    batch = extractor.describe_images(images + same_size, batch_size=4)
    single = np.stack([extractor.describe(image) for image in images + same_size])
    np.testing.assert_allclose(batch, single, atol=1e-4)


@pytest.mark.weights
def test_multiscale_is_order_independent_and_matches_per_scale_maths(real_photos) -> None:
    require_weights("resnet50.keras-imagenet")
    image = load_image(real_photos[0])
    forward = Extractor(DescriptorSettings(imsize=256, scales=MULTI_SCALES, precision="fp32"))
    backward = Extractor(DescriptorSettings(imsize=256, scales=MULTI_SCALES[::-1], precision="fp32"))
    combined = forward.describe(image)
    np.testing.assert_allclose(combined, backward.describe(image), atol=1e-6)
    per_scale = np.stack([forward.describe_tensors(t[None])[0] for t in forward.scaled_inputs(image)])
    np.testing.assert_allclose(combined, naive_combine(per_scale, forward.scale_power), atol=1e-5)
    sides = [max(t.shape[1:]) for t in forward.scaled_inputs(image)]
    assert sides == [256, round(256 / math.sqrt(2)), 128]


def test_small_images_are_not_upscaled(extractor) -> None:
    small = Image.new("RGB", (120, 90), (200, 30, 30))
    (tensor,) = extractor.scaled_inputs(small)
    assert tuple(tensor.shape) == (3, 90, 120)
    (tensor,) = extractor.scaled_inputs(Image.new("RGB", (1000, 500)))
    assert tuple(tensor.shape) == (3, 128, 256)


@pytest.mark.weights
def test_bbox_crop_describes_only_the_box(extractor, real_photos) -> None:
    image = load_image(real_photos[0])
    box = (10, 20, 200, 180)
    np.testing.assert_allclose(
        extractor.describe(image, bbox=box), extractor.describe(image.crop(box)), atol=1e-5
    )
    assert float(extractor.describe(image, bbox=box) @ extractor.describe(image)) < 0.999


@pytest.mark.weights
def test_bad_files_are_reported_and_skipped_in_order(extractor, real_photos, tmp_path: Path) -> None:
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    truncated = tmp_path / "half.jpg"
    truncated.write_bytes(real_photos[0].read_bytes()[:2000])
    paths = [real_photos[0], empty, real_photos[1], text, truncated, real_photos[2]]
    results = list(extractor.describe_files(paths, batch_size=2, window=3))
    assert [r.path for r in results] == paths
    assert [r.vector is not None for r in results] == [True, False, True, False, False, True]
    for result in results:
        if result.vector is None:
            assert result.error is not None and str(result.path) in str(result.error)
    np.testing.assert_allclose(results[2].vector, extractor.describe(load_image(real_photos[1])), atol=1e-5)


@pytest.mark.weights
@pytest.mark.skipif(not cpu_info().has_bf16, reason="this CPU has no native bf16")
def test_bf16_agrees_with_fp32_on_real_photos(real_photos) -> None:
    require_weights("resnet50.keras-imagenet")
    fp32 = Extractor(DescriptorSettings(imsize=512, precision="fp32"))
    bf16 = Extractor(DescriptorSettings(imsize=512, precision="bf16"))
    images = [load_image(p) for p in real_photos]
    a, b = fp32.describe_images(images), bf16.describe_images(images)
    assert np.min(np.sum(a * b, axis=1)) >= 0.999
    assert rankings_agree(a @ a.T, b @ b.T)


def test_auto_precision_is_fp32_without_native_bf16(monkeypatch) -> None:
    from lookalike import precision
    from lookalike.cpu import CpuInfo

    monkeypatch.setattr(precision, "cpu_info", lambda: CpuInfo("plain", 2, frozenset({"avx2"})))
    config = get_model_config("resnet50.keras-imagenet")
    assert resolve_precision(None, config, "auto") == "fp32"  # type: ignore[arg-type]
    assert resolve_precision(None, config, "bf16") == "bf16"  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["efficientnet-lite0", "resnet50-caffe"])
def test_inference_net_never_changes_the_reference_network(arch) -> None:
    """The fp32 reference must stay fp32 even where batch-norm folding cannot trace the backbone."""
    from lookalike.backbones import build_backbone
    from lookalike.network import DescriptorNet, InferenceNet
    from lookalike.pooling import build_pooling

    reference = DescriptorNet(build_backbone(arch), build_pooling("gem")).eval()
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    fast = InferenceNet(reference, "bf16")
    x = torch.rand(1, 3, 96, 128)
    with torch.inference_mode():
        reference(x)
    assert all(v.dtype != torch.bfloat16 for v in reference.state_dict().values())
    assert all(torch.equal(before[k], v) for k, v in reference.state_dict().items())
    assert fast(x).shape == (1, reference.dim)


def test_equal_key_batches_group_by_key_in_order_and_bound_the_batch() -> None:
    from lookalike.extract import equal_key_batches

    keys = ["a", "b", "a", "a", "c", "b", "a"]
    assert list(equal_key_batches(keys, 2)) == [[0, 2], [3, 6], [1, 5], [4]]
    assert list(equal_key_batches(keys)) == [[0, 2, 3, 6], [1, 5], [4]]
    assert list(equal_key_batches([], 3)) == []
