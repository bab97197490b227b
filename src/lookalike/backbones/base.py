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

    def stages(self) -> list[nn.Module]:
        """The backbone's successive stages, input side first (fine-tuning freezes the first few)."""
        raise ConfigError(f"{type(self).__name__} does not name its stages, so none can be frozen")

    def classify(self, fmap: torch.Tensor) -> torch.Tensor:
        head = getattr(self, "fc", None)
        if head is None:
            raise ConfigError(f"{type(self).__name__} has no classifier head")
        return head(torch.flatten(nn.functional.adaptive_avg_pool2d(fmap, 1), 1))


def split_at_pools(layers: nn.Sequential) -> list[nn.Module]:
    """``layers`` cut after each max-pool: the stages of a plain convolutional stack (VGG, AlexNet)."""
    stages: list[nn.Module] = []
    run: list[nn.Module] = []
    for layer in layers:
        run.append(layer)
        if isinstance(layer, nn.MaxPool2d):
            stages.append(nn.ModuleList(run))
            run = []
    return [*stages, nn.ModuleList(run)] if run else stages
