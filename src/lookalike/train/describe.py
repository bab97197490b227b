"""What the training loop needs besides its steps: training images at their size, descriptors of them with
the current network, frozen stages, Adam's parameter groups and the first whitening layer."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from PIL import Image
from torch import nn

from lookalike.attention import AttentiveBackbone
from lookalike.backbones.base import Backbone
from lookalike.errors import ConfigError, ImageError, TrainingSetError
from lookalike.extract import equal_key_batches
from lookalike.images import load_image, resize_max_side
from lookalike.network import DescriptorNet, InferenceNet, Precision
from lookalike.registry import Preprocess
from lookalike.train.heads import WhiteningLayer
from lookalike.train.tuples import sample_pool
from lookalike.transforms import to_tensor
from lookalike.whitening import fit_chosen_pca_whitening, fit_learned_whitening

DESCRIBE_BATCH: Final = 8
DECODE_WORKERS: Final = 2
CHUNK: Final = 64  # images decoded and described at a time
POOL_LR_FACTOR: Final = 10.0  # GeM's p learns ten times faster, without weight decay (cirtorch)
PAIRS_PER_IMAGE: Final = 20  # at most this many same-class pairs per image fit the first whitening layer

Counter = Callable[[int, int], None]


def load_training_image(path: str | Path, imsize: int) -> Image.Image:
    """An RGB training image, shrunk so its long side is at most ``imsize`` (never enlarged, as cirtorch)."""
    return resize_max_side(load_image(path), imsize)


def load_images(paths: Sequence[Path], imsize: int) -> list[Image.Image | ImageError]:
    """Each path's :func:`load_training_image`, or the error that stopped it, decoded in threads."""

    def one(path: Path) -> Image.Image | ImageError:
        try:
            return load_training_image(path, imsize)
        except ImageError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=DECODE_WORKERS) as pool:
        return list(pool.map(one, paths))


def describe_images(
    net: InferenceNet, images: Sequence[Image.Image], preprocess: Preprocess, batch_size: int = DESCRIBE_BATCH
) -> np.ndarray:
    """``(N, D)`` float32 descriptors of ``images``, same-size inputs batched together."""
    tensors = [to_tensor(image, preprocess) for image in images]
    rows: list[np.ndarray | None] = [None] * len(tensors)
    for batch in equal_key_batches([tuple(t.shape) for t in tensors], batch_size):
        out = net(torch.stack([tensors[i] for i in batch])).float().numpy()
        for i, row in zip(batch, out, strict=True):
            rows[i] = row
    return np.stack(rows) if rows else np.zeros((0, 0), np.float32)  # type: ignore[arg-type]


def describe_paths(
    net: DescriptorNet,
    paths: Sequence[Path],
    preprocess: Preprocess,
    imsize: int,
    precision: Precision = "fp32",
    progress: Counter | None = None,
) -> tuple[dict[int, np.ndarray], dict[int, str], float]:
    """Descriptors of ``paths`` by position with ``net`` in eval mode (folded, as inference runs it), the
    positions that could not be decoded with the reason, and the network's images per second."""
    net.eval()
    inference = InferenceNet(net, precision)
    described: dict[int, np.ndarray] = {}
    failed: dict[int, str] = {}
    seconds = 0.0
    for start in range(0, len(paths), CHUNK):
        loaded = load_images(paths[start : start + CHUNK], imsize)
        good = [(start + i, item) for i, item in enumerate(loaded) if isinstance(item, Image.Image)]
        failed.update(
            {start + i: item.reason for i, item in enumerate(loaded) if isinstance(item, ImageError)}
        )
        if good:
            began = time.perf_counter()
            rows = describe_images(inference, [image for _, image in good], preprocess)
            seconds += time.perf_counter() - began
            described.update({index: row for (index, _), row in zip(good, rows, strict=True)})
        if progress is not None:
            progress(min(start + CHUNK, len(paths)), len(paths))
    return described, failed, len(described) / seconds if seconds > 0 else 0.0


def base_backbone(net: DescriptorNet) -> Backbone:
    """The backbone under any attention block."""
    features = net.features
    return features.backbone if isinstance(features, AttentiveBackbone) else features


def freeze_stages(net: DescriptorNet, count: int) -> None:
    """Stop gradients to the first ``count`` stages of the backbone (``Backbone.stages``)."""
    if count == 0:
        return
    backbone = base_backbone(net)
    stages = backbone.stages()
    if count > len(stages):
        raise ConfigError(f"cannot freeze {count} stages: {type(backbone).__name__} has {len(stages)}")
    for stage in stages[:count]:
        for parameter in stage.parameters():
            parameter.requires_grad_(False)


def parameter_groups(net: DescriptorNet, lr: float, weight_decay: float) -> list[dict[str, Any]]:
    """Adam's groups: the backbone (and attention), GeM's p at ``POOL_LR_FACTOR`` times the rate without
    weight decay, the whitening layer; only trainable parameters, empty groups left out."""
    parts: list[tuple[nn.Module, float, float]] = [
        (net.features, lr, weight_decay),
        (net.pool, lr * POOL_LR_FACTOR, 0.0),
    ]
    if net.whiten is not None:
        parts.append((net.whiten, lr, weight_decay))
    groups = [
        {"params": [p for p in module.parameters() if p.requires_grad], "lr": rate, "weight_decay": decay}
        for module, rate, decay in parts
    ]
    kept = [group for group in groups if group["params"]]
    if not kept:
        raise ConfigError("nothing to train: every parameter is frozen")
    return kept


def same_class_pairs(labels: np.ndarray, rng: np.random.Generator, limit: int) -> np.ndarray:
    """Every pair ``(i, j)``, ``i < j``, of rows with the same label, ``(P, 2)`` sorted; a uniform sample
    of ``limit`` of them when there are more."""
    labels = np.asarray(labels)
    found = []
    for value in np.unique(labels):
        members = np.flatnonzero(labels == value)
        first, second = np.triu_indices(members.size, k=1)
        found.append(np.stack([members[first], members[second]], axis=1))
    pairs = np.concatenate(found) if found else np.zeros((0, 2), np.int64)
    pairs = pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]
    if len(pairs) > limit:
        pairs = pairs[np.sort(rng.choice(len(pairs), size=limit, replace=False))]
    return pairs.astype(np.int64)


def initial_whitening(
    net: DescriptorNet,
    paths: Sequence[Path],
    labels: np.ndarray,
    preprocess: Preprocess,
    imsize: int,
    pool_size: int,
    rng: np.random.Generator,
    pca: bool = False,
    progress: Counter | None = None,
) -> WhiteningLayer:
    """The first end-to-end whitening layer: learned whitening (or PCA-whitening with ``pca``) of the
    current network's descriptors of a :func:`~lookalike.train.tuples.sample_pool` of ``pool_size``
    training images, keeping the ``min(D, N − 1)`` directions that ``N`` descriptors can vary in."""
    if net.whiten is not None:
        raise ConfigError("the network already has a whitening layer")
    chosen = sample_pool(labels, pool_size, rng)
    described, _, _ = describe_paths(net, [paths[i] for i in chosen], preprocess, imsize, "fp32", progress)
    kept = sorted(described)
    x = np.stack([described[i] for i in kept])
    if pca:
        whitening, _ = fit_chosen_pca_whitening(x)
        return WhiteningLayer(whitening)
    pairs = same_class_pairs(np.asarray(labels)[chosen][kept], rng, PAIRS_PER_IMAGE * len(kept))
    if not len(pairs):
        raise TrainingSetError(
            f"the {len(kept)} images described for the whitening layer hold no two of one class; "
            "enlarge the pool"
        )
    return WhiteningLayer(fit_learned_whitening(x, pairs, dim=min(x.shape[1], len(kept) - 1)))


__all__ = [
    "POOL_LR_FACTOR",
    "base_backbone",
    "describe_images",
    "describe_paths",
    "freeze_stages",
    "initial_whitening",
    "load_images",
    "load_training_image",
    "parameter_groups",
    "same_class_pairs",
]
