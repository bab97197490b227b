"""Weight converters: TF.js/Keras ResNet layout and cirtorch layout onto our modules."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from lookalike.backbones import build_backbone
from lookalike.converters import (
    cirtorch_state_dict,
    convert_keras_tfjs,
    keras_resnet_state_dict,
    read_tfjs_layers_model,
)
from lookalike.errors import WeightsError
from lookalike.weights import load_into

BN = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_variance"}


def keras_name(key: str) -> str | None:
    """Our ResNet key → the Keras weight name (the inverse of the converter, written independently)."""
    parts = key.split(".")
    if parts[-1] == "num_batches_tracked":
        return None
    if parts[0] in ("conv1", "fc"):
        layer = "conv1" if parts[0] == "conv1" else "fc1000"
        return f"{layer}/{'kernel' if parts[1] == 'weight' else 'bias'}"
    if parts[0] == "bn1":
        return f"bn_conv1/{BN[parts[1]]}"
    stage, block = int(parts[0][-1]) + 1, "abcdefghijklmnopqrstuvwxyz"[int(parts[1])]
    if parts[2] == "downsample":
        branch, is_bn, param = "1", parts[3] == "1", parts[4]
    else:
        branch, is_bn, param = "2" + "abc"[int(parts[2][-1]) - 1], parts[2].startswith("bn"), parts[3]
    if is_bn:
        return f"bn{stage}{block}_branch{branch}/{BN[param]}"
    return f"res{stage}{block}_branch{branch}/{'kernel' if param == 'weight' else 'bias'}"


def to_keras_layout(value: torch.Tensor) -> np.ndarray:
    array = value.numpy()
    if array.ndim == 4:
        return array.transpose(2, 3, 1, 0)  # (out, in, kh, kw) → (kh, kw, in, out)
    if array.ndim == 2:
        return array.T
    return array


def write_tfjs(folder: Path, weights: dict[str, np.ndarray], shards: int = 3) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    specs = [{"name": n, "shape": list(a.shape), "dtype": "float32"} for n, a in weights.items()]
    blob = b"".join(np.ascontiguousarray(a, dtype="<f4").tobytes() for a in weights.values())
    size = -(-len(blob) // shards)
    paths = []
    for index in range(shards):
        name = f"group1-shard{index + 1}of{shards}.bin"
        (folder / name).write_bytes(blob[index * size : (index + 1) * size])
        paths.append(name)
    manifest = {"format": "layers-model", "weightsManifest": [{"paths": paths, "weights": specs}]}
    (folder / "model.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def caffe_resnet50_state() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = build_backbone("resnet50-caffe")
    for module in net.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-1, 1)
            module.running_var.uniform_(0.5, 2)
    return net.state_dict()


def test_tfjs_resnet_round_trip_loads_strictly(tmp_path, caffe_resnet50_state) -> None:
    keras = {keras_name(k): to_keras_layout(v) for k, v in caffe_resnet50_state.items() if keras_name(k)}
    write_tfjs(tmp_path / "ResNet50", keras)
    converted = convert_keras_tfjs(tmp_path / "ResNet50")
    net = build_backbone("resnet50-caffe")
    load_into(net, converted, "round trip")
    for key, value in net.state_dict().items():
        assert torch.equal(value, caffe_resnet50_state[key]), key


def test_keras_convolution_semantics_survive_conversion() -> None:
    """A Keras conv (NHWC input, HWIO kernel, stride 2, valid) computed by hand equals our converted conv."""
    rng = np.random.default_rng(1)
    image = rng.standard_normal((1, 7, 9, 3)).astype("f4")
    kernel = rng.standard_normal((3, 3, 3, 4)).astype("f4")
    bias = rng.standard_normal(4).astype("f4")
    out_h, out_w = 3, 4
    expected = np.zeros((1, out_h, out_w, 4), "f4")
    for y in range(out_h):
        for x in range(out_w):
            patch = image[0, 2 * y : 2 * y + 3, 2 * x : 2 * x + 3, :]
            expected[0, y, x] = np.tensordot(patch, kernel, axes=([0, 1, 2], [0, 1, 2])) + bias
    state = keras_resnet_state_dict({"conv1/kernel": kernel, "conv1/bias": bias})
    conv = torch.nn.Conv2d(3, 4, 3, stride=2)
    conv.load_state_dict({"weight": state["conv1.weight"], "bias": state["conv1.bias"]})
    with torch.no_grad():
        ours = conv(torch.from_numpy(image).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(ours, expected, atol=1e-5)


def test_dense_kernel_is_transposed() -> None:
    kernel = np.arange(6, dtype="f4").reshape(3, 2)  # (in, out)
    state = keras_resnet_state_dict({"fc1000/kernel": kernel, "fc1000/bias": np.zeros(2, "f4")})
    assert state["fc.weight"].shape == (2, 3)
    assert torch.equal(state["fc.weight"], torch.from_numpy(kernel.T.copy()))


def test_tfjs_reader_rejects_short_shards_and_unknown_names(tmp_path) -> None:
    write_tfjs(tmp_path / "m", {"conv1/kernel": np.ones((2, 2, 3, 4), "f4")}, shards=1)
    (tmp_path / "m" / "group1-shard1of1.bin").write_bytes(b"\0" * 10)
    with pytest.raises(WeightsError, match="shards end"):
        read_tfjs_layers_model(tmp_path / "m")
    with pytest.raises(WeightsError, match=r"not a TF\.js"):
        read_tfjs_layers_model(tmp_path / "missing")
    with pytest.raises(WeightsError, match="unexpected Keras weight"):
        keras_resnet_state_dict({"mystery/kernel": np.ones(1, "f4")})


def test_cirtorch_feature_indices_map_to_resnet_names() -> None:
    state = {
        "features.0.weight": torch.ones(1),
        "features.1.running_var": torch.ones(1),
        "features.7.2.conv3.weight": torch.ones(1),
        "pool.p": torch.ones(1),
        "whiten.weight": torch.ones(1),
    }
    mapped = cirtorch_state_dict(state, "resnet101")
    assert set(mapped) == {
        "conv1.weight",
        "bn1.running_var",
        "layer4.2.conv3.weight",
        "pool.p",
        "whiten.weight",
    }
    assert set(cirtorch_state_dict(state, "vgg16")) == set(state)
