"""The fine-tuning loop: each epoch describes a pool with the current network, mines hard negatives, builds
tuples and trains on them (cirtorch's recipe, Radenović et al. TPAMI 2018).

:class:`Trainer` holds the network, a :class:`~lookalike.train.losses.Loss` and a
:class:`~lookalike.train.sources.TupleSource`, all injected; it builds Adam and the per-epoch exponential
schedule from :class:`~lookalike.train.settings.TrainSettings`. BatchNorm layers keep their ImageNet
statistics throughout (cirtorch freezes them: images go through one at a time there, so batch statistics
would be per image), which also makes a batch's descriptors independent of how its images are grouped.
An image that fails to decode is left out — its tuple skipped, the image never drawn again — and reported
in the epoch's :class:`EpochStats`, never a crash. :meth:`Trainer.state` / :meth:`Trainer.restore` carry
everything a resumed run needs to continue exactly where the saved one was: network, Adam, schedule,
random generators, the chosen precision and the images left out.

bf16: with ``precision="auto"`` on a CPU with native bf16, the first ``BF16_CHECK_BATCHES`` batches are
trained in fp32 while their loss is also computed under bf16 autocast; bf16 is kept only if every pair
agrees within ``BF16_LOSS_RTOL`` (relative) or ``BF16_LOSS_ATOL``, else training stays in fp32 and the
reason is logged and recorded.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from lookalike.cpu import cpu_info
from lookalike.errors import CheckpointError, ImageError, TrainingSetError, WeightsError
from lookalike.extract import equal_key_batches
from lookalike.network import (
    DescriptorNet,
    Precision,
    descriptor_head,
    descriptor_state,
    load_descriptor_state,
)
from lookalike.registry import Preprocess
from lookalike.train.describe import (
    describe_paths,
    freeze_stages,
    load_images,
    parameter_groups,
)
from lookalike.train.losses import Loss, Targets
from lookalike.train.settings import TrainSettings
from lookalike.train.sources import TupleSource
from lookalike.train.tuples import EpochSample, sample_epoch, tuple_targets
from lookalike.transforms import to_tensor

log = logging.getLogger(__name__)

BF16_CHECK_BATCHES: Final = 2
BF16_LOSS_RTOL: Final = 0.05
BF16_LOSS_ATOL: Final = 1e-3


@dataclass(frozen=True)
class TrainProgress:
    """Where an epoch is: ``stage`` ``describe`` (the pool, ``done`` of ``total`` images) or ``train``
    (``done`` of ``total`` tuples, ``loss`` the running mean of the batch losses)."""

    epoch: int
    stage: str
    done: int
    total: int
    loss: float | None = None


Progress = Callable[[TrainProgress], None]


@dataclass(frozen=True)
class StepStats:
    """One optimiser step: the batch loss, and sums over its ``tuples`` (``active`` counts those whose own
    loss is non-zero; the distances are query–positive and mean query–negative)."""

    loss: float
    tuples: int
    active: int
    positive_distance: float
    negative_distance: float
    images: int
    seconds: float


@dataclass(frozen=True)
class EpochStats:
    """An epoch: mean batch ``loss``, mean query–positive and query–negative distances of its tuples, the
    fraction of tuples with a non-zero loss, images per second through forward + backward + step and
    through the eval-mode network describing the pool, the learning rate it used, and the images left
    out because they could not be decoded, as ``(path, reason)``."""

    epoch: int
    loss: float
    positive_distance: float
    negative_distance: float
    active: float
    tuples: int
    train_images_per_second: float
    describe_images_per_second: float
    lr: float
    precision: str
    seconds: float
    skipped: tuple[tuple[str, str], ...] = ()

    def record(self) -> dict[str, Any]:
        """JSON-able values (NaN, as in an epoch without a tuple, becomes None)."""
        record = {key: _json_number(value) for key, value in dataclasses.asdict(self).items()}
        record["skipped"] = [list(item) for item in self.skipped]
        return record


def _json_number(value: Any) -> Any:
    return None if isinstance(value, float) and not math.isfinite(value) else value


@dataclass(frozen=True, eq=False)
class TrainerState:
    """A trainer's state: ``tensors`` (``model.*`` in the layout of
    :func:`~lookalike.network.descriptor_state`, ``optimizer.<param>.<name>``) and a JSON-able ``record``."""

    tensors: dict[str, Tensor]
    record: dict[str, Any]


def forward_descriptors(net: DescriptorNet, x: Tensor, precision: Precision) -> Tensor:
    """Training-mode descriptors of a same-size batch: the backbone under bf16 autocast when asked, the
    head (pooling, whitening layer, L2) in float32."""
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
        fmap = net.features(x)
    return descriptor_head(fmap, net.pool, net.whiten)


def bf16_disagreement(fp32: float, bf16: float) -> str | None:
    """Why a bf16 loss cannot stand in for the fp32 one, or None when they agree."""
    if math.isfinite(bf16) and abs(bf16 - fp32) <= max(BF16_LOSS_RTOL * abs(fp32), BF16_LOSS_ATOL):
        return None
    return f"the bf16 loss {bf16:.6g} differs from the fp32 loss {fp32:.6g} by more than {BF16_LOSS_RTOL:.0%}"


def _tuple_stats(desc: Tensor, targets: Targets, loss: Loss) -> tuple[int, float, float]:
    size = targets.tuple_size or 2
    rows = desc.reshape(-1, size, desc.shape[1])
    positive = torch.linalg.vector_norm(rows[:, 0] - rows[:, 1], dim=-1).sum().item()
    negative = torch.linalg.vector_norm(rows[:, :1] - rows[:, 2:], dim=-1).mean(dim=1).sum().item()
    labels = targets.labels.reshape(-1, size)
    active = sum(float(loss(rows[t], Targets(labels[t], size))) > 0 for t in range(rows.shape[0]))
    return active, positive, negative


class Trainer:
    """Fine-tunes ``net`` with ``loss`` on the tuples of ``source`` (see the module docstring)."""

    def __init__(
        self,
        net: DescriptorNet,
        loss: Loss,
        source: TupleSource,
        preprocess: Preprocess,
        settings: TrainSettings,
    ) -> None:
        self.net = net
        self.loss = loss
        self.source = source
        self.preprocess = preprocess
        self.settings = settings
        self.epoch = 0
        self.rng = np.random.default_rng(settings.seed)
        self.failed: dict[int, str] = {}
        self.history: list[dict[str, Any]] = []
        self.bf16_checks: list[tuple[float, float]] = []
        self.precision: Precision | None = None
        self.precision_reason = ""
        self._choose_precision(settings.precision)
        freeze_stages(net, settings.freeze)
        self.optimizer = torch.optim.Adam(parameter_groups(net, settings.lr, settings.weight_decay))
        self.scheduler = torch.optim.lr_scheduler.ExponentialLR(self.optimizer, math.exp(-settings.lr_decay))

    def _choose_precision(self, requested: str) -> None:
        if requested == "fp32":
            self.precision, self.precision_reason = "fp32", "asked for"
        elif requested == "bf16":
            self.precision, self.precision_reason = "bf16", "asked for"
            if not cpu_info().has_bf16:
                log.warning("bf16 asked for on a CPU without native bf16: expect it to be slow")
        elif not cpu_info().has_bf16:
            self.precision, self.precision_reason = "fp32", "this CPU has no native bf16"

    # ---- epochs ------------------------------------------------------------------------------------

    def run_epoch(self, progress: Progress | None = None) -> EpochStats:
        """Describe, mine, train one epoch; the schedule steps after it."""
        epoch = self.epoch + 1
        started = time.perf_counter()
        lr = float(self.optimizer.param_groups[0]["lr"])
        new_failures: dict[int, str] = {}
        sample, query_desc, pool_desc, describe_rate = self._describe_epoch(epoch, new_failures, progress)
        tuples = self.source.tuples(sample, query_desc, pool_desc, self.rng)
        tuples = tuples[self.rng.permutation(len(tuples))]
        seeds = self.rng.integers(0, np.iinfo(np.int64).max, size=tuples.shape)
        steps: list[StepStats] = []
        batch = self.settings.batch_tuples
        for start in range(0, len(tuples), batch):
            step = self.step(tuples[start : start + batch], seeds[start : start + batch], new_failures)
            if step.tuples:
                steps.append(step)
            if progress is not None:
                losses = [s.loss for s in steps]
                mean = float(np.mean(losses)) if losses else None
                progress(TrainProgress(epoch, "train", min(start + batch, len(tuples)), len(tuples), mean))
        self.scheduler.step()
        self.epoch = epoch
        stats = self._epoch_stats(epoch, steps, describe_rate, lr, started, new_failures)
        self.history.append(stats.record())
        return stats

    def _epoch_stats(
        self,
        epoch: int,
        steps: list[StepStats],
        describe_rate: float,
        lr: float,
        started: float,
        failures: dict[int, str],
    ) -> EpochStats:
        tuples = sum(s.tuples for s in steps)
        seconds = sum(s.seconds for s in steps)
        paths = self.source.images.paths
        return EpochStats(
            epoch=epoch,
            loss=float(np.mean([s.loss for s in steps])) if steps else math.nan,
            positive_distance=sum(s.positive_distance for s in steps) / tuples if tuples else math.nan,
            negative_distance=sum(s.negative_distance for s in steps) / tuples if tuples else math.nan,
            active=sum(s.active for s in steps) / tuples if tuples else math.nan,
            tuples=tuples,
            train_images_per_second=sum(s.images for s in steps) / seconds if seconds else 0.0,
            describe_images_per_second=describe_rate,
            lr=lr,
            precision=self.precision or "fp32",
            seconds=time.perf_counter() - started,
            skipped=tuple((str(paths[i]), reason) for i, reason in sorted(failures.items())),
        )

    def _describe_epoch(
        self, epoch: int, failures: dict[int, str], progress: Progress | None
    ) -> tuple[EpochSample, np.ndarray, np.ndarray, float]:
        images = self.source.images
        usable = np.array([i for i in range(len(images)) if i not in self.failed], dtype=np.int64)
        drawn = sample_epoch(
            images.labels[usable], self.settings.query_count, self.settings.pool_size, self.rng
        )
        wanted = np.union1d(usable[drawn.queries], usable[drawn.pool])

        def counted(done: int, total: int) -> None:
            if progress is not None:
                progress(TrainProgress(epoch, "describe", done, total))

        self.optimizer.zero_grad(set_to_none=True)
        found, failed, rate = describe_paths(
            self.net,
            [images.paths[i] for i in wanted],
            self.preprocess,
            self.settings.imsize,
            self.precision or "fp32",
            counted,
        )
        for position, reason in failed.items():
            self._fail(int(wanted[position]), reason, failures)
        described = {int(wanted[position]): row for position, row in found.items()}
        queries = np.array([i for i in usable[drawn.queries] if i in described], dtype=np.int64)
        pool = np.array([i for i in usable[drawn.pool] if i in described], dtype=np.int64)
        if not queries.size or not pool.size:
            raise TrainingSetError(f"epoch {epoch}: none of the drawn images could be decoded")
        query_desc = np.stack([described[int(i)] for i in queries])
        pool_desc = np.stack([described[int(i)] for i in pool])
        return EpochSample(queries, pool), query_desc, pool_desc, rate

    def _fail(self, index: int, reason: str, failures: dict[int, str] | None) -> None:
        log.warning("%s left out of training: %s", self.source.images.paths[index], reason)
        self.failed[index] = reason
        if failures is not None:
            failures[index] = reason

    # ---- steps -------------------------------------------------------------------------------------

    def _train_mode(self) -> None:
        self.net.train()
        for module in self.net.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()

    def _render(
        self, tuples: np.ndarray, seeds: np.ndarray, failures: dict[int, str] | None
    ) -> tuple[np.ndarray, list[Image.Image]]:
        """The tuples whose every image decodes, and their images in row order."""
        unique = sorted({int(i) for i in tuples.ravel()} - set(self.failed))
        loaded = load_images([self.source.images.paths[i] for i in unique], self.settings.imsize)
        images: dict[int, Image.Image] = {}
        for index, item in zip(unique, loaded, strict=True):
            if isinstance(item, ImageError):
                self._fail(index, item.reason, failures)
            else:
                images[index] = item
        kept = np.array(
            [t for t in range(len(tuples)) if all(int(i) in images for i in tuples[t])], dtype=int
        )
        rendered = [
            self.source.render(images[int(tuples[t, slot])], slot, int(seeds[t, slot]))
            for t in kept
            for slot in range(tuples.shape[1])
        ]
        return kept, rendered

    def _forward(self, tensors: list[Tensor], precision: Precision) -> Tensor:
        """Descriptors ``(N, D)`` of inputs of any sizes, in input order (same-size inputs batched)."""
        groups = list(equal_key_batches([tuple(t.shape) for t in tensors]))
        parts = [
            forward_descriptors(self.net, torch.stack([tensors[i] for i in g]), precision) for g in groups
        ]
        order = torch.tensor([i for g in groups for i in g])
        return torch.cat(parts)[torch.argsort(order)]

    def step(
        self, tuples: np.ndarray, seeds: np.ndarray | None = None, failures: dict[int, str] | None = None
    ) -> StepStats:
        """One optimiser step on a batch of tuples ``(T, S)`` of dataset indices; ``seeds`` ``(T, S)``
        draw each slot's rendering (augmentation). Tuples with an undecodable image are skipped."""
        tuples = np.asarray(tuples, dtype=np.int64)
        seeds = np.zeros(tuples.shape, dtype=np.int64) if seeds is None else np.asarray(seeds)
        kept, images = self._render(tuples, seeds, failures)
        if not kept.size:
            return StepStats(math.nan, 0, 0, 0.0, 0.0, 0, 0.0)
        tensors = [to_tensor(image, self.preprocess) for image in images]
        targets = tuple_targets(tuples[kept], self.source.images.labels)
        self._train_mode()
        if self.precision is None:
            self._check_bf16(tensors, targets)
        began = time.perf_counter()
        desc = self._forward(tensors, self.precision or "fp32")
        loss = self.loss(desc, targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        seconds = time.perf_counter() - began
        with torch.no_grad():
            active, positive, negative = _tuple_stats(desc.detach(), targets, self.loss)
        return StepStats(float(loss.detach()), len(kept), active, positive, negative, len(tensors), seconds)

    def _check_bf16(self, tensors: list[Tensor], targets: Targets) -> None:
        with torch.no_grad():
            fp32 = float(self.loss(self._forward(tensors, "fp32"), targets))
            bf16 = float(self.loss(self._forward(tensors, "bf16"), targets))
        self.bf16_checks.append((fp32, bf16))
        reason = bf16_disagreement(fp32, bf16)
        if reason is not None:
            self.precision, self.precision_reason = "fp32", reason
            log.warning("training in fp32: %s", reason)
        elif len(self.bf16_checks) >= BF16_CHECK_BATCHES:
            self.precision = "bf16"
            self.precision_reason = f"the bf16 loss agreed with fp32 on {len(self.bf16_checks)} batches"
            log.info("training in bf16: %s", self.precision_reason)

    # ---- state -------------------------------------------------------------------------------------

    def state(self) -> TrainerState:
        """Everything :meth:`restore` needs, as tensors and JSON-able values."""
        tensors = {f"model.{key}": value for key, value in descriptor_state(self.net).items()}
        optimizer = self.optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for param, entry in optimizer["state"].items():
            for name, value in entry.items():
                if isinstance(value, Tensor):
                    tensors[f"optimizer.{param}.{name}"] = value.detach().clone().contiguous()
                else:
                    scalars.setdefault(str(param), {})[name] = value
        paths = self.source.images.paths
        record = {
            "settings": self.settings.record(),
            "epoch": self.epoch,
            "images": len(paths),
            "optimizer": {"param_groups": optimizer["param_groups"], "scalars": scalars},
            "scheduler": self.scheduler.state_dict(),
            "rng": {
                "numpy": self.rng.bit_generator.state,
                "torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode("ascii"),
            },
            "precision": self.precision,
            "precision_reason": self.precision_reason,
            "bf16_checks": [[_json_number(a), _json_number(b)] for a, b in self.bf16_checks],
            "failed": [[str(paths[i]), reason] for i, reason in sorted(self.failed.items())],
            "history": list(self.history),
        }
        return TrainerState(tensors, record)

    def restore(self, state: TrainerState) -> None:
        """Continue from ``state`` (of a trainer with the same settings but ``epochs``)."""
        record, tensors = state.record, state.tensors
        try:
            saved = TrainSettings.from_record(record["settings"])
            differences = saved.differences(self.settings)
            if differences:
                raise CheckpointError(
                    f"the checkpoint was trained with other settings: {'; '.join(differences)}"
                )
            load_descriptor_state(self.net, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            entries: dict[int, dict[str, Any]] = {
                int(param): dict(scalars) for param, scalars in record["optimizer"]["scalars"].items()
            }
            for key, value in tensors.items():
                if key.startswith("optimizer."):
                    _, param, name = key.split(".", 2)
                    entries.setdefault(int(param), {})[name] = value
            self.optimizer.load_state_dict(
                {"state": entries, "param_groups": record["optimizer"]["param_groups"]}
            )
            self.scheduler.load_state_dict(record["scheduler"])
            self.rng.bit_generator.state = record["rng"]["numpy"]
            torch_state = base64.b64decode(record["rng"]["torch"])
            torch.set_rng_state(torch.frombuffer(bytearray(torch_state), dtype=torch.uint8))
            by_path = {str(path): i for i, path in enumerate(self.source.images.paths)}
            self.failed = {by_path[p]: reason for p, reason in record["failed"] if p in by_path}
            self.epoch = int(record["epoch"])
            self.precision = record["precision"]
            self.precision_reason = str(record["precision_reason"])
            self.bf16_checks = [
                (math.nan if a is None else float(a), math.nan if b is None else float(b))
                for a, b in record["bf16_checks"]
            ]
            self.history = list(record["history"])
        except (KeyError, TypeError, ValueError, RuntimeError, WeightsError) as exc:
            raise CheckpointError(f"the checkpoint does not fit this network or is damaged ({exc})") from exc
        if record.get("images") != len(self.source.images):
            log.warning(
                "the training set has %d images, the checkpoint's had %s: continuing with today's",
                len(self.source.images),
                record.get("images"),
            )


__all__ = [
    "BF16_CHECK_BATCHES",
    "BF16_LOSS_ATOL",
    "BF16_LOSS_RTOL",
    "EpochStats",
    "Progress",
    "StepStats",
    "TrainProgress",
    "Trainer",
    "TrainerState",
    "bf16_disagreement",
    "forward_descriptors",
]
