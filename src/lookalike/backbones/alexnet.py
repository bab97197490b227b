"""AlexNet with torchvision's module names (the single-tower variant of "One weird trick", 64-192-384-256-256).

The retrieval feature map is the ReLU after ``conv5`` (13×13 at 224 input); the final max-pool is applied
only by ``classify``, which then follows torchvision: adaptive average pool to 6×6, flatten, classifier.
"""

from __future__ import annotations

import torch
from torch import nn

from lookalike.backbones.base import Backbone, split_at_pools
from lookalike.errors import ConfigError


class AlexNet(Backbone):
    """``features.{0,3,6,8,10}`` are the convolutions; index 12 (the last max-pool) is ``final_pool``.

    The pool has no parameters, so the state dict keys are exactly torchvision's.
    """

    def __init__(self, num_classes: int | None = 1000) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=11, stride=4, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(64, 192, kernel_size=5, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
        )
        self.final_pool = nn.MaxPool2d(kernel_size=3, stride=2)
        self.out_channels = 256
        self.avgpool = nn.AdaptiveAvgPool2d((6, 6))
        self.classifier: nn.Sequential | None = None
        if num_classes:
            self.classifier = nn.Sequential(
                nn.Dropout(),
                nn.Linear(256 * 6 * 6, 4096),
                nn.ReLU(inplace=True),
                nn.Dropout(),
                nn.Linear(4096, 4096),
                nn.ReLU(inplace=True),
                nn.Linear(4096, num_classes),
            )

    def stages(self) -> list[nn.Module]:
        """The runs of ``features`` that each end with a max-pool, then the layers after the last one."""
        return split_at_pools(self.features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def classify(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.classifier is None:
            raise ConfigError("AlexNet was built without a classifier head")
        return self.classifier(torch.flatten(self.avgpool(self.final_pool(fmap)), 1))


def alexnet(num_classes: int | None = 1000) -> AlexNet:
    return AlexNet(num_classes)
