"""Global descriptors of images and files: resizing, multi-scale, batching, precision, parallel decoding."""

from __future__ import annotations

import hashlib
import logging
import math
from collections import defaultdict
from collections.abc import Hashable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image
from torch import nn

from lookalike.cpu import keep_heap
from lookalike.errors import ConfigError, ImageError, WeightsError
from lookalike.images import (
    DEFAULT_MAX_PIXELS,
    crop_bbox,
    load_image_bytes,
    read_file_bytes,
    resize_long_side,
    resize_max_side,
)
from lookalike.network import InferenceNet, Precision, build_descriptor_net
from lookalike.pooling import build_pooling, gem_power
from lookalike.precision import resolve_precision
from lookalike.registry import DEFAULT_MODEL, ModelConfig, get_model_config
from lookalike.transforms import to_tensor
from lookalike.weights import weights_head

log = logging.getLogger(__name__)

MULTI_SCALES = (1.0, 1 / math.sqrt(2), 0.5)
SEED_MULTI_SCALES = (1.0, math.sqrt(2), 1 / math.sqrt(2))
BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class DescriptorSettings:
    """Everything that determines a descriptor; two equal settings give comparable vectors. ``pooling``
    None is the model's own default (:attr:`ModelConfig.pooling`), resolved on construction."""

    model: str = DEFAULT_MODEL
    pooling: str | None = None  # None: the model's default, resolved on construction
    gem_p: float | None = None
    imsize: int = 1024
    scales: tuple[float, ...] = (1.0,)
    precision: str = "auto"

    def __post_init__(self) -> None:
        if self.pooling is None:
            object.__setattr__(self, "pooling", get_model_config(self.model).pooling)
        if self.imsize < 32:
            raise ConfigError(f"imsize must be at least 32, got {self.imsize}")
        if not self.scales or any(s <= 0 for s in self.scales):
            raise ConfigError(f"scales must be positive, got {self.scales}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"precision must be auto, fp32 or bf16, got {self.precision!r}")


@dataclass(frozen=True)
class ResolvedDescriptor:
    """A descriptor's identity resolved once from its settings, the registry and the cached weights' header,
    without building the network: what every part that must agree on it (collections, the extractor,
    evaluation) reads. ``gem_p`` is the exponent GeM uses (None for other poolings); ``scale_power`` how the
    scales combine."""

    settings: DescriptorSettings
    config: ModelConfig
    weights_sha256: str
    pooling: str
    gem_p: float | None
    scale_power: float
    dim: int

    def identity(self) -> dict[str, object]:
        """What makes two descriptors comparable, as a collection records it (``gem_p`` as requested)."""
        s = self.settings
        return {"model": s.model, "weights_sha256": self.weights_sha256, "pooling": self.pooling,
                "gem_p": s.gem_p, "imsize": s.imsize, "scales": list(s.scales), "dim": self.dim}  # fmt: skip


def _same_p(a: float | None, b: float | None) -> bool:
    return a == b if a is None or b is None else math.isclose(a, b, rel_tol=1e-6)


def resolve_descriptor(settings: DescriptorSettings) -> ResolvedDescriptor:
    """Resolve ``settings`` (weights pulled into the cache when needed, but not loaded)."""
    config = get_model_config(settings.model)
    if config.kind != "global":
        raise ConfigError(
            f"{config.name} finds local features, not image descriptors: use it for spatial verification "
            "(`--rerank sv`, `index --local-features xfeat`), and a global model with -m"
        )
    head = weights_head(config)
    pooling = settings.pooling or config.pooling
    gem_p = None
    if pooling == "gem":
        gem_p = next(p for p in (settings.gem_p, head.gem_p, config.gem_p) if p is not None)
    whiten_layer = config.learned_whitening
    dim = head.whiten_dim if whiten_layer and head.whiten_dim else config.feature_dim
    power = scale_combination_power(pooling, gem_p or 1.0, whiten_layer)
    return ResolvedDescriptor(settings, config, head.sha256, pooling, gem_p, power, dim)


@dataclass
class FileDescriptor:
    """The outcome for one file: a descriptor, or the error that made it skip. ``sha256`` is the hash of
    the very bytes that were decoded (a file rewritten meanwhile cannot pass off one content for another)."""

    index: int
    path: Path
    vector: np.ndarray | None = None
    size: tuple[int, int] | None = None
    error: ImageError | None = None
    sha256: str | None = None


@dataclass
class _Decoded:
    index: int
    path: Path
    tensors: list[torch.Tensor] = field(default_factory=list)
    size: tuple[int, int] | None = None
    error: ImageError | None = None
    sha256: str | None = None


def scale_combination_power(pooling: str, net_p: float, has_whiten_layer: bool) -> float:
    """Exponent of the generalised mean over scales: GeM's p for GeM without a whitening layer, else 1."""
    return net_p if pooling == "gem" and not has_whiten_layer else 1.0


def combine_scales(vectors: np.ndarray, power: float) -> np.ndarray:
    """``(S, D)`` L2-normalised descriptors of one image at S scales → one L2-normalised ``(D,)``."""
    if vectors.shape[0] == 1:
        return vectors[0]
    if power == 1.0:
        combined = vectors.mean(axis=0)
    else:
        combined = np.power(np.power(np.clip(vectors, 0, None), power).mean(axis=0), 1.0 / power)
    return (combined / max(np.linalg.norm(combined), 1e-12)).astype(np.float32)


def equal_key_batches(keys: Sequence[Hashable], batch_size: int | None = None) -> Iterator[list[int]]:
    """Positions of ``keys`` in batches that share one key (inputs of one size, stackable into one tensor),
    at most ``batch_size`` long (``None``: no limit); keys in order of first appearance, each batch in
    input order."""
    groups: dict[Hashable, list[int]] = defaultdict(list)
    for position, key in enumerate(keys):
        groups[key].append(position)
    for members in groups.values():
        step = batch_size or len(members)
        for start in range(0, len(members), step):
            yield members[start : start + step]


class Describer(Protocol):
    """What turns images into descriptors for a collection: the in-process :class:`Extractor` today; a pool
    of Ray workers or an ONNX model are other implementations of the same four members (all read-only, so a
    describer built on first use fits too)."""

    @property
    def resolved(self) -> ResolvedDescriptor: ...

    @property
    def dim(self) -> int: ...

    def describe(self, image: Image.Image, bbox: BBox | None = None) -> np.ndarray: ...

    def describe_files(self, paths: Iterable[str | Path]) -> Iterator[FileDescriptor]: ...


class Extractor:
    """Turns images into global descriptors with one model and one set of settings."""

    def __init__(
        self,
        settings: DescriptorSettings | None = None,
        max_pixels: int | None = DEFAULT_MAX_PIXELS,
    ) -> None:
        self.settings = settings or DescriptorSettings()
        keep_heap()
        self.resolved = resolve_descriptor(self.settings)
        self.config: ModelConfig = self.resolved.config
        self.max_pixels = max_pixels
        reference = build_descriptor_net(self.config, self.resolved.pooling, self.settings.gem_p)
        built_p, resolved_p = gem_power(reference.pool), self.resolved.gem_p
        if reference.dim != self.resolved.dim or not _same_p(built_p, resolved_p):
            raise WeightsError(
                f"{self.config.name}: the network built ({reference.dim}-D, p {gem_power(reference.pool)}) differs "
                f"from the registry's description ({self.resolved.dim}-D, p {self.resolved.gem_p})"
            )
        self.precision: Precision = resolve_precision(reference, self.config, self.settings.precision)
        self.net = InferenceNet(reference, self.precision)
        self.reference_net = reference
        self.scale_power = self.resolved.scale_power

    @property
    def dim(self) -> int:
        return self.reference_net.dim

    def scaled_inputs(self, image: Image.Image, bbox: BBox | None = None) -> list[torch.Tensor]:
        """One normalised tensor per scale: long side ``min(imsize, long side)·s``, never upscaled at s=1."""
        if bbox is not None:
            image = crop_bbox(image, bbox)
        base = resize_max_side(image, self.settings.imsize)
        long_side = max(base.size)
        tensors = []
        for scale in self.settings.scales:
            scaled = base if scale == 1.0 else resize_long_side(image, max(1, round(long_side * scale)))
            tensors.append(to_tensor(scaled, self.config.preprocess))
        return tensors

    def describe_tensors(self, batch: torch.Tensor) -> np.ndarray:
        """A batch of same-size inputs ``(N, 3, H, W)`` → ``(N, D)`` float32 rows."""
        return self.net(batch).numpy().astype(np.float32, copy=False)

    def resolved_as(self, pooling: str) -> ResolvedDescriptor:
        """The identity of ``pooling`` on this backbone, as indexing with ``--pooling POOLING`` resolves
        it (its GeM p, its scale-combination power)."""
        if pooling == self.resolved.pooling:
            return self.resolved
        return resolve_descriptor(replace(self.settings, pooling=pooling))

    def pooling_modules(self, poolings: Sequence[str]) -> dict[str, nn.Module]:
        """For each name, the pooling that indexing with ``--pooling NAME`` applies to this backbone's
        feature maps: the network's own for its own pooling (a trained GeM keeps its p), else a fresh
        module with the p :meth:`resolved_as` gives."""
        return {
            name: self.net.pool
            if name == self.resolved.pooling
            else build_pooling(name, p=self.resolved_as(name).gem_p)
            for name in poolings
        }

    def describe_poolings(self, batch: torch.Tensor, pools: Mapping[str, nn.Module]) -> dict[str, np.ndarray]:
        """Every pooling of ``pools`` from one backbone pass over a same-size batch: ``(N, D)`` each."""
        fmap = self.net.feature_map(batch)
        return {name: self.net.head(fmap, pool).numpy() for name, pool in pools.items()}

    def describe(self, image: Image.Image, bbox: BBox | None = None) -> np.ndarray:
        """The ``(D,)`` descriptor of one RGB image, optionally cropped to ``bbox`` first."""
        per_scale = [self.describe_tensors(t[None])[0] for t in self.scaled_inputs(image, bbox)]
        return combine_scales(np.stack(per_scale), self.scale_power)

    def describe_images(self, images: Sequence[Image.Image], batch_size: int = 8) -> np.ndarray:
        """``(N, D)`` descriptors of in-memory images, same-size inputs batched together."""
        decoded = [_Decoded(i, Path(f"<image {i}>"), self.scaled_inputs(img)) for i, img in enumerate(images)]
        vectors = self._run_batched(decoded, batch_size)
        return np.stack([vectors[i] for i in range(len(images))]) if images else np.zeros((0, self.dim), "f4")

    def _decode(self, index: int, path: Path) -> _Decoded:
        try:
            data, _ = read_file_bytes(path)
            image = load_image_bytes(data, name=str(path), max_pixels=self.max_pixels)
            sha256 = hashlib.sha256(data).hexdigest()
            return _Decoded(index, path, self.scaled_inputs(image), size=image.size, sha256=sha256)
        except ImageError as exc:
            return _Decoded(index, path, error=exc)

    def _run_batched(self, items: list[_Decoded], batch_size: int) -> dict[int, np.ndarray]:
        inputs = [(item.index, s, tensor) for item in items for s, tensor in enumerate(item.tensors)]
        per_scale: dict[int, list[tuple[int, np.ndarray]]] = defaultdict(list)
        for batch in equal_key_batches([(s, *tensor.shape) for _, s, tensor in inputs], batch_size):
            rows = self.describe_tensors(torch.stack([inputs[i][2] for i in batch]))
            for i, row in zip(batch, rows, strict=True):
                index, scale_index, _ = inputs[i]
                per_scale[index].append((scale_index, row))
        return {
            index: combine_scales(
                np.stack([row for _, row in sorted(rows, key=lambda r: r[0])]), self.scale_power
            )
            for index, rows in per_scale.items()
        }

    def describe_files(
        self,
        paths: Iterable[str | Path],
        batch_size: int = 8,
        window: int = 32,
        workers: int = 2,
    ) -> Iterator[FileDescriptor]:
        """Descriptors of files in input order; a file that cannot be read yields its error, not a crash.

        Files are decoded in a thread pool while the previous window runs through the network; within a
        window, inputs of identical size are batched.
        """
        if batch_size < 1 or window < 1:
            raise ConfigError("batch_size and window must be at least 1")
        listed = [Path(p) for p in paths]
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            pending = self._submit(pool, listed, 0, window)
            for start in range(0, len(listed), window):
                decoded = [future.result() for future in pending]
                pending = self._submit(pool, listed, start + window, window)
                vectors = self._run_batched([d for d in decoded if d.error is None], batch_size)
                for item in decoded:
                    yield FileDescriptor(
                        item.index, item.path, vectors.get(item.index), item.size, item.error, item.sha256
                    )

    def _submit(self, pool: ThreadPoolExecutor, paths: list[Path], start: int, count: int) -> list[Future]:
        return [pool.submit(self._decode, i, paths[i]) for i in range(start, min(start + count, len(paths)))]
