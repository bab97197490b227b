"""ResNet-50/101/152 in two weight layouts.

``torchvision`` layout: the stride of a down-sampling bottleneck sits on its 3×3 convolution, convolutions
have no bias, BatchNorm eps is 1e-5. ``caffe`` layout (the original MSRA Caffe models and the Keras port):
the stride sits on the first 1×1 convolution, convolutions carry a bias, BatchNorm eps is 1e-3. Module
names follow torchvision in both, so one converter per source maps its keys onto this tree.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from lookalike.backbones.base import Backbone

BLOCKS_PER_STAGE = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3), 152: (3, 8, 36, 3)}
EXPANSION = 4


@dataclass(frozen=True)
class ResNetLayout:
    stride_on_first_conv: bool
    conv_bias: bool
    bn_eps: float


TORCHVISION = ResNetLayout(stride_on_first_conv=False, conv_bias=False, bn_eps=1e-5)
CAFFE = ResNetLayout(stride_on_first_conv=True, conv_bias=True, bn_eps=1e-3)
LAYOUTS = {"torchvision": TORCHVISION, "caffe": CAFFE}


class Bottleneck(nn.Module):
    def __init__(self, inplanes: int, planes: int, stride: int, layout: ResNetLayout) -> None:
        super().__init__()
        stride1, stride2 = (stride, 1) if layout.stride_on_first_conv else (1, stride)
        bias = layout.conv_bias
        self.conv1 = nn.Conv2d(inplanes, planes, 1, stride=stride1, bias=bias)
        self.bn1 = nn.BatchNorm2d(planes, eps=layout.bn_eps)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride2, padding=1, bias=bias)
        self.bn2 = nn.BatchNorm2d(planes, eps=layout.bn_eps)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=bias)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION, eps=layout.bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.downsample: nn.Module | None = None
        if stride != 1 or inplanes != planes * EXPANSION:
            self.downsample = nn.Sequential(
                nn.Conv2d(inplanes, planes * EXPANSION, 1, stride=stride, bias=bias),
                nn.BatchNorm2d(planes * EXPANSION, eps=layout.bn_eps),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(Backbone):
    layer1: nn.Sequential
    layer2: nn.Sequential
    layer3: nn.Sequential
    layer4: nn.Sequential

    def __init__(
        self, depth: int, layout: ResNetLayout = TORCHVISION, num_classes: int | None = 1000
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=layout.conv_bias)
        self.bn1 = nn.BatchNorm2d(64, eps=layout.bn_eps)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        inplanes = 64
        for index, blocks in enumerate(BLOCKS_PER_STAGE[depth]):
            planes = 64 * 2**index
            stride = 1 if index == 0 else 2
            stage = []
            for block in range(blocks):
                stage.append(Bottleneck(inplanes, planes, stride if block == 0 else 1, layout))
                inplanes = planes * EXPANSION
            self.add_module(f"layer{index + 1}", nn.Sequential(*stage))
        self.out_channels = inplanes
        self.fc = nn.Linear(inplanes, num_classes) if num_classes else None

    def stages(self) -> list[nn.Module]:
        """The stem (``conv1``, ``bn1``), then ``layer1`` … ``layer4``."""
        return [nn.ModuleList([self.conv1, self.bn1]), self.layer1, self.layer2, self.layer3, self.layer4]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = stage(x)
        return x


def resnet(depth: int, layout: str = "torchvision", num_classes: int | None = 1000) -> ResNet:
    return ResNet(depth, LAYOUTS[layout], num_classes)
