"""Proof that pretrained weights load right: every model whose weights are cached here classifies real
photos correctly (a cat is a cat class, an espresso is an espresso)."""

from __future__ import annotations

import pytest

from lookalike.classify import classify_image, imagenet_labels
from lookalike.registry import list_models
from tests.conftest import require_weights

CAT_CLASSES = {"tabby", "tiger_cat", "Persian_cat", "Siamese_cat", "Egyptian_cat"}
CLASSIFIERS = [config.name for config in list_models() if config.has_classifier]


def test_imagenet_labels_are_the_standard_order() -> None:
    labels = imagenet_labels()
    assert len(labels) == 1000
    assert labels[281] == "tabby" and labels[967] == "espresso" and labels[0] == "tench"


@pytest.mark.weights
@pytest.mark.parametrize("name", CLASSIFIERS)
def test_real_photos_are_classified_correctly(name, chelsea, coffee) -> None:
    require_weights(name)
    cat_top = classify_image(chelsea, name, top=3)
    assert cat_top[0][0] in CAT_CLASSES, cat_top
    assert sum(p for label, p in cat_top if label in CAT_CLASSES) > 0.5
    coffee_top = classify_image(coffee, name, top=3)
    assert coffee_top[0][0] == "espresso", coffee_top
    assert coffee_top[0][1] > 0.5


@pytest.mark.weights
def test_resmem_weights_expect_unit_rgb_not_imagenet_normalisation(chelsea) -> None:
    from dataclasses import replace

    from lookalike.classify import imagenet_probabilities, load_classifier
    from lookalike.registry import TORCHVISION_PREPROCESS, get_model_config

    require_weights("resnet152.resmem")
    config = get_model_config("resnet152.resmem")
    wrong = replace(config, preprocess=TORCHVISION_PREPROCESS)
    probabilities = imagenet_probabilities(load_classifier(config), wrong, chelsea)
    assert imagenet_labels()[int(probabilities.argmax())] not in CAT_CLASSES
