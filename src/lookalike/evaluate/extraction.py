"""Descriptors for evaluation: every pooling from one backbone pass, per scale, cached per setting.

The backbone runs once per image and scale; MAC, SPoC, R-MAC and GeM are all pooled from that feature map,
so a table over poolings × single/multi-scale costs one extraction. Results are cached under
``$LOOKALIKE_HOME/eval-cache`` keyed by the model, its weights, image size, scales, poolings, the crops and
the files (path, size, mtime), so a table of runs never re-extracts what it already has.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from torch import nn

from lookalike.atomic import save_npz_atomic
from lookalike.errors import ImageError
from lookalike.extract import BBox, Extractor, combine_scales
from lookalike.images import load_image
from lookalike.weights import lookalike_home, weights_sha256

POOLINGS = ("mac", "spoc", "rmac", "gem")
T = TypeVar("T")


@dataclass(frozen=True)
class PerScaleDescriptors:
    """``vectors[pooling]`` is (N, S, D): L2-normalised descriptors of N images at S scales.

    ``failed`` marks images that could not be read (their rows are zero). ``seconds_per_scale`` is the
    mean backbone time per image for each scale and ``pooling_seconds[pooling]`` the mean time of that
    pooling per image and scale (decoding excluded).
    """

    scales: tuple[float, ...]
    vectors: dict[str, np.ndarray]
    failed: np.ndarray
    seconds_per_scale: np.ndarray
    pooling_seconds: dict[str, float]

    def single(self, pooling: str) -> np.ndarray:
        """(N, D) descriptors at scale 1."""
        return np.ascontiguousarray(self.vectors[pooling][:, self.scales.index(1.0)])

    def multi(self, pooling: str, power: float) -> np.ndarray:
        """(N, D) multi-scale descriptors: generalised mean over scales with ``power``, then L2."""
        stacked = self.vectors[pooling]
        return np.stack([combine_scales(stacked[i], power) for i in range(len(stacked))])

    def seconds(self, pooling: str, multiscale: bool) -> float:
        """Mean extraction time per image of one variant: backbone plus its pooling, at one or all scales."""
        if multiscale:
            return float(self.seconds_per_scale.sum() + len(self.scales) * self.pooling_seconds[pooling])
        return float(self.seconds_per_scale[self.scales.index(1.0)] + self.pooling_seconds[pooling])


def fingerprint(paths: Sequence[Path], bboxes: Sequence[BBox | None] | None) -> str:
    digest = hashlib.sha256()
    for index, path in enumerate(paths):
        stat = path.stat()
        box = bboxes[index] if bboxes else None
        # resolved: the same files named relative or through a symlink are the same cache entry
        digest.update(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{box}\n".encode())
    return digest.hexdigest()


def cache_key(extractor: Extractor, poolings: Sequence[str], paths: Sequence[Path], bboxes) -> str:
    identity = {
        "model": extractor.settings.model,
        "weights": weights_sha256(extractor.config),
        "imsize": extractor.settings.imsize,
        "scales": list(extractor.settings.scales),
        "poolings": list(poolings),
        "gem_p": extractor.settings.gem_p,
        "precision": extractor.precision,
        "files": fingerprint(paths, bboxes),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


def _pool_all(
    extractor: Extractor, pools: dict[str, nn.Module], tensor: torch.Tensor, clock: dict[str, float]
) -> dict[str, np.ndarray]:
    """Descriptors of every pooling from one backbone pass; ``clock`` accumulates the time of each part."""
    started = time.perf_counter()
    fmap = extractor.net.feature_map(tensor[None])
    clock["backbone"] += time.perf_counter() - started
    pooled = {}
    for name, pool in pools.items():
        started = time.perf_counter()
        pooled[name] = extractor.net.head(fmap, pool)[0].numpy()
        clock[name] += time.perf_counter() - started
    return pooled


def extract_variants(
    extractor: Extractor,
    paths: Sequence[Path],
    bboxes: Sequence[BBox | None] | None = None,
    progress: Callable[[int, int], None] | None = None,
    use_cache: bool = True,
) -> PerScaleDescriptors:
    """Per-scale descriptors of ``paths`` for every pooling (optionally cropped to ``bboxes``), cached."""
    poolings = POOLINGS
    scales = extractor.settings.scales
    cache = lookalike_home() / "eval-cache" / f"{cache_key(extractor, poolings, paths, bboxes)}.npz"
    if use_cache and cache.exists():
        with np.load(cache, allow_pickle=False) as data:
            timing = {p: float(data[f"seconds_{p}"]) for p in poolings}
            vectors = {p: data[p] for p in poolings}
            return PerScaleDescriptors(scales, vectors, data["failed"], data["seconds_per_scale"], timing)
    pools = extractor.pooling_modules(poolings)
    vectors = {name: np.zeros((len(paths), len(scales), extractor.dim), np.float32) for name in poolings}
    failed = np.zeros(len(paths), bool)
    seconds = np.zeros(len(scales))
    clock = dict.fromkeys(["backbone", *poolings], 0.0)

    def decode(index: int) -> list[torch.Tensor] | None:
        try:
            return extractor.scaled_inputs(load_image(paths[index]), bboxes[index] if bboxes else None)
        except ImageError:
            return None

    with ThreadPoolExecutor(max_workers=1) as pool:
        for index, tensors in enumerate(prefetched(pool, decode, len(paths))):
            if tensors is None:
                failed[index] = True
                continue
            for scale_index, tensor in enumerate(tensors):
                before = clock["backbone"]
                pooled = _pool_all(extractor, pools, tensor, clock)
                seconds[scale_index] += clock["backbone"] - before
                for name, vector in pooled.items():
                    vectors[name][index, scale_index] = vector
            if progress is not None:
                progress(index + 1, len(paths))
    described = max(1, int((~failed).sum()))
    seconds /= described
    timing = {name: clock[name] / (described * len(scales)) for name in poolings}
    result = PerScaleDescriptors(scales, vectors, failed, seconds, timing)
    if use_cache:
        extra = {f"seconds_{name}": np.asarray(value) for name, value in timing.items()}
        save_npz_atomic(cache, failed=failed, seconds_per_scale=seconds, **vectors, **extra)
    return result


def prefetched(pool: ThreadPoolExecutor, work: Callable[[int], T], count: int, ahead: int = 8) -> Iterator[T]:
    """``work(0) … work(count - 1)`` in order, computed in ``pool`` at most ``ahead`` items in advance."""
    pending: deque[Future[T]] = deque(pool.submit(work, i) for i in range(min(ahead, count)))
    for index in range(count):
        result = pending.popleft().result()
        if index + ahead < count:
            pending.append(pool.submit(work, index + ahead))
        yield result


def multiscale_power(pooling: str, extractor: Extractor) -> float:
    """The exponent that combines ``pooling``'s per-scale descriptors: indexing's rule for the pooling
    evaluated, not for the extractor's own (GeM's p for GeM on an R-MAC model too; 1 for the others)."""
    return extractor.resolved_as(pooling).scale_power
