"""VGG-16 with torchvision's module names, so ``vgg16-397923af.pth`` loads with ``strict=True``.

As in cirtorch, the retrieval feature map is the ReLU after the last convolution (``conv5_3``); the final
max-pool is applied only by ``classify``, which then follows torchvision: adaptive average pool to 7×7,
flatten, three fully connected layers.
"""

from __future__ import annotations

import torch
from torch import nn

from lookalike.backbones.base import Backbone, split_at_pools
from lookalike.errors import ConfigError

# Configuration "D" of Simonyan & Zisserman: output channels of each 3×3 convolution, "M" for a 2×2 max-pool.
VGG16_LAYERS: tuple[int | str, ...] = (
    *(64, 64, "M"),
    *(128, 128, "M"),
    *(256, 256, 256, "M"),
    *(512, 512, 512, "M"),
    *(512, 512, 512, "M"),
)


def _feature_layers(config: tuple[int | str, ...]) -> list[nn.Module]:
    layers: list[nn.Module] = []
    in_channels = 3
    for item in config:
        if isinstance(item, str):
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return layers


class VGG(Backbone):
    """``features`` holds torchvision's layers up to the last ReLU; its final max-pool is ``final_pool``.

    The pool has no parameters, so the state dict keys are exactly torchvision's.
    """

    def __init__(self, config: tuple[int | str, ...] = VGG16_LAYERS, num_classes: int | None = 1000) -> None:
        super().__init__()
        layers = _feature_layers(config)
        if not isinstance(layers[-1], nn.MaxPool2d):
            raise ConfigError("a VGG configuration must end with a max-pool ('M')")
        self.features = nn.Sequential(*layers[:-1])
        self.final_pool = layers[-1]
        self.out_channels = next(c for c in reversed(config) if isinstance(c, int))
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier: nn.Sequential | None = None
        if num_classes:
            self.classifier = nn.Sequential(
                nn.Linear(self.out_channels * 7 * 7, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(),
                nn.Linear(4096, num_classes),
            )

    def stages(self) -> list[nn.Module]:
        """The runs of ``features`` that each end with a max-pool, then the layers after the last one."""
        return split_at_pools(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def classify(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise ConfigError("VGG was built without a classifier head")
        return self.classifier(torch.flatten(self.avgpool(self.final_pool(fmap)), 1))


def vgg16(num_classes: int | None = 1000) -> VGG:
    return VGG(VGG16_LAYERS, num_classes)
