"""ImageNet classification with a backbone's own head: the proof that its weights were loaded right."""

from __future__ import annotations

import json
from functools import cache
from importlib import resources
from pathlib import Path

import torch
from PIL import Image

from lookalike.backbones import Backbone, build_backbone
from lookalike.errors import ConfigError
from lookalike.images import load_image
from lookalike.registry import ModelConfig, get_model_config
from lookalike.transforms import classification_input
from lookalike.weights import load_into, load_weights


@cache
def imagenet_labels() -> tuple[str, ...]:
    text = resources.files("lookalike.data").joinpath("imagenet_classes.json").read_text()
    return tuple(json.loads(text))


def load_classifier(config: ModelConfig) -> Backbone:
    if not config.has_classifier:
        raise ConfigError(f"{config.name} has no ImageNet classifier head")
    backbone = build_backbone(config.arch)
    load_into(backbone, load_weights(config), config.name)
    return backbone.eval()


def imagenet_probabilities(backbone: Backbone, config: ModelConfig, image: Image.Image) -> torch.Tensor:
    batch = classification_input(image, config.preprocess, config.classify_size)[None]
    with torch.inference_mode():
        return backbone.classify(backbone(batch)).softmax(dim=-1)[0]


def classify_image(image: str | Path | Image.Image, model: str, top: int = 5) -> list[tuple[str, float]]:
    """The ``top`` ImageNet labels of ``image`` with their probabilities."""
    config = get_model_config(model)
    picture = image if isinstance(image, Image.Image) else load_image(image)
    probabilities = imagenet_probabilities(load_classifier(config), config, picture)
    values, indices = probabilities.topk(top)
    labels = imagenet_labels()
    return [(labels[i], float(v)) for v, i in zip(values.tolist(), indices.tolist(), strict=True)]
