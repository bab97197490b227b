"""The contract every backbone follows: images in, last convolutional feature map out."""

from __future__ import annotations

import torch
from torch import nn

from lookalike.errors import ConfigError


class Backbone(nn.Module):
    """A CNN cut after its last convolutional block.

    ``forward`` maps a normalised batch ``(N, 3, H, W)`` to the feature map ``(N, out_channels, h, w)``
    that pooling consumes. ``classify`` maps that feature map to ImageNet logits when the network kept
    its classifier; it exists to prove that weights were loaded correctly.
    """

    out_channels: int

    def classify(self, fmap: torch.Tensor) -> torch.Tensor:
        head = getattr(self, "fc", None)
        if head is None:
            raise ConfigError(f"{type(self).__name__} has no classifier head")
        return head(torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1))
