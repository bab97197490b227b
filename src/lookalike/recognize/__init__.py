"""Landmark recognition with k-nearest-neighbour classifiers over global descriptors.

:mod:`~lookalike.recognize.knn` holds the similarity transforms, the voting rules (k-NN, 1-NN, mean k-NN,
α-expanded mean k-NN) and :class:`KnnClassifier`; :mod:`~lookalike.recognize.multiscale` compares
multi-scale descriptors through similarity matrices (:class:`MultiScaleKnn`) or aggregates chosen scales
(:class:`AggregatedClassifier`). Predictions carry a confidence for ranking by micro-AP / GAP.
:class:`Recognizer` (:mod:`~lookalike.recognize.service`) recognises images against the labelled images of
a collection.
"""

from __future__ import annotations

from lookalike.recognize.knn import (
    METHODS,
    TRANSFORMS,
    KnnClassifier,
    Neighbour,
    Prediction,
    alpha_mean_knn_classify,
    exact_search,
    knn_classify,
    mean_knn_classify,
    nn_classify,
)
from lookalike.recognize.multiscale import (
    DEFAULT_SCALES,
    REDUCERS,
    AggregatedClassifier,
    MultiScaleKnn,
    MultiScaleWhitening,
    aggregate,
    binary_weight_vectors,
    fit_multiscale_whitening,
    similarity_matrices,
)
from lookalike.recognize.service import Recognizer, RecognizerOptions

__all__ = [
    "DEFAULT_SCALES",
    "METHODS",
    "REDUCERS",
    "TRANSFORMS",
    "AggregatedClassifier",
    "KnnClassifier",
    "MultiScaleKnn",
    "MultiScaleWhitening",
    "Neighbour",
    "Prediction",
    "Recognizer",
    "RecognizerOptions",
    "aggregate",
    "alpha_mean_knn_classify",
    "binary_weight_vectors",
    "exact_search",
    "fit_multiscale_whitening",
    "knn_classify",
    "mean_knn_classify",
    "nn_classify",
    "similarity_matrices",
]
