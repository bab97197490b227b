"""Backbone architectures, our own code (no torchvision). ``build_backbone(arch)`` is the single factory."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from lookalike.backbones.base import Backbone
from lookalike.errors import ConfigError


def _resnet(depth: int, layout: str) -> Backbone:
    from lookalike.backbones.resnet import resnet

    return resnet(depth, layout)


def _vgg16() -> Backbone:
    from lookalike.backbones.vgg import vgg16

    return vgg16()


def _alexnet() -> Backbone:
    from lookalike.backbones.alexnet import alexnet

    return alexnet()


def _efficientnet_lite0() -> Backbone:
    from lookalike.backbones.efficientnet import efficientnet_lite0

    return efficientnet_lite0()


ARCHITECTURES: dict[str, Callable[[], Backbone]] = {
    **{f"resnet{d}": partial(_resnet, d, "torchvision") for d in (50, 101, 152)},
    **{f"resnet{d}-caffe": partial(_resnet, d, "caffe") for d in (50, 101, 152)},
    "vgg16": _vgg16,
    "alexnet": _alexnet,
    "efficientnet-lite0": _efficientnet_lite0,
}


def build_backbone(arch: str) -> Backbone:
    """A freshly initialised backbone of architecture ``arch`` (weights are loaded by the caller)."""
    try:
        factory = ARCHITECTURES[arch]
    except KeyError:
        raise ConfigError(
            f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}"
        ) from None
    return factory()


__all__ = ["ARCHITECTURES", "Backbone", "build_backbone"]
