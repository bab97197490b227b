"""One training run as ``lookalike train`` makes it: settings and a name in, epochs out, each one
checkpointed and published as the local model NAME before it is reported.

Running the same settings again resumes from the last completed epoch (``epochs`` may grow); other
settings are refused, and ``restart`` discards the checkpoint instead. A run holds an exclusive lock on
its folder, so two runs never train one name at once.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from lookalike.atomic import exclusive_lock
from lookalike.attention import AttentiveBackbone, with_attention
from lookalike.errors import CheckpointError, ConfigError
from lookalike.home import models_folder
from lookalike.network import DescriptorNet, build_descriptor_net
from lookalike.pooling import gem_power
from lookalike.registry import MODEL_FILE, ModelConfig, check_local_name, get_model_config, read_local_model
from lookalike.train.checkpoint import discard_checkpoint, load_checkpoint, pending_name, save_checkpoint
from lookalike.train.describe import base_backbone, initial_whitening
from lookalike.train.heads import LearnableGeM
from lookalike.train.loop import EpochStats, Progress, Trainer, TrainerState, TrainProgress
from lookalike.train.publish import WEIGHTS_FILE, publish_model, published_epoch
from lookalike.train.settings import TrainSettings, build_loss
from lookalike.train.sources import AugmentedTuples, HardNegativeTuples, TupleSource, training_images
from lookalike.train.tuples import TrainingImages

LOCK_FILE = ".train.lock"


def training_net(base: ModelConfig, settings: TrainSettings) -> DescriptorNet:
    """``base``'s network made trainable: learnable GeM (from the base's p), no classifier, a fresh
    second-order attention block with ``settings.soa`` (a base that has one keeps it)."""
    net = build_descriptor_net(base, "gem")
    backbone = base_backbone(net)
    if getattr(backbone, "fc", None) is not None:
        backbone.fc = None  # type: ignore[assignment]
    if settings.soa and not isinstance(net.features, AttentiveBackbone):
        net.features = with_attention(net.features)
    pool = LearnableGeM()
    with torch.no_grad():
        pool.p.fill_(gem_power(net.pool) or pool.p.item())
    net.pool = pool
    return net


def tuple_source(settings: TrainSettings, images: TrainingImages) -> TupleSource:
    if settings.pool_size < settings.negatives + 1:
        raise ConfigError(
            f"a pool of {settings.pool_size} images cannot hold {settings.negatives} negatives of other "
            "classes than a query's: enlarge the pool or lower the number of negatives"
        )
    if settings.unlabelled:
        return AugmentedTuples(images, settings.negatives, augment_query=settings.augment_query)
    return HardNegativeTuples(images, settings.negatives, settings.positives)  # type: ignore[arg-type]


def _lock(folder: Path) -> ExitStack:
    """The run's exclusive lock on ``folder``, held until the returned stack is closed."""
    folder.mkdir(parents=True, exist_ok=True)
    held = ExitStack()
    busy = CheckpointError(f"another `lookalike train` is training {folder.name}")
    held.enter_context(exclusive_lock(folder / LOCK_FILE, busy))
    return held


def _discard(folder: Path) -> None:
    discard_checkpoint(folder)
    for name in (MODEL_FILE, WEIGHTS_FILE, pending_name(WEIGHTS_FILE)):
        (folder / name).unlink(missing_ok=True)


class TrainingRun:
    """A fine-tuning run of ``settings`` under ``name``; :meth:`open` makes one, :meth:`epochs` trains."""

    def __init__(
        self, folder: Path, base: ModelConfig, trainer: Trainer, lock: ExitStack, model: ModelConfig | None
    ) -> None:
        self.folder = folder
        self.base = base
        self.trainer = trainer
        self.resumed_from = trainer.epoch
        self.model = model
        self._lock = lock

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def settings(self) -> TrainSettings:
        return self.trainer.settings

    @property
    def images(self) -> TrainingImages:
        return self.trainer.source.images

    @classmethod
    def open(
        cls, settings: TrainSettings, name: str, restart: bool = False, progress: Progress | None = None
    ) -> TrainingRun:
        """Check everything, then resume NAME's checkpoint or start afresh (``restart``: discard it).

        The training set is read (unreadable files skipped, :class:`TrainingSetError` for fewer than two
        classes or a class of one image) and the network built before any epoch starts."""
        check_local_name(name)
        if name == settings.backbone:
            raise ConfigError(f"a model cannot be trained into its own name {name!r}")
        settings = replace(settings, data=os.path.abspath(os.path.expanduser(settings.data)))
        folder = models_folder() / name
        lock = _lock(folder)
        try:
            if restart:
                _discard(folder)
            checkpoint = _matching_checkpoint(folder, settings)
            base = get_model_config(settings.backbone)
            images = training_images(settings.data, settings.unlabelled)
            source = tuple_source(settings, images)
            torch.manual_seed(settings.seed)
            net = training_net(base, settings)
            if checkpoint is not None:
                weight = checkpoint.tensors.get("model.whiten.weight")
                if weight is not None and net.whiten is None:
                    net.whiten = nn.Linear(weight.shape[1], weight.shape[0])
            elif settings.whiten_layer and net.whiten is None:
                net.whiten = _first_whitening(net, images, base, settings, progress)
            trainer = Trainer(net, build_loss(settings), source, base.preprocess, settings)
            model = None
            if checkpoint is not None:
                trainer.restore(checkpoint)
                model = _published(folder, trainer, base)
            return cls(folder, base, trainer, lock, model)
        except BaseException:
            if [p.name for p in folder.iterdir()] == [LOCK_FILE]:  # nothing trained yet: leave no trace
                shutil.rmtree(folder, ignore_errors=True)
            lock.close()
            raise

    def epochs(self, progress: Progress | None = None) -> Iterator[EpochStats]:
        """Train up to ``settings.epochs``; each epoch is checkpointed and published before it is yielded."""
        while self.trainer.epoch < self.settings.epochs:
            stats = self.trainer.run_epoch(progress)
            save_checkpoint(self.folder, self.trainer.state())
            self.model = publish_model(
                self.folder, self.trainer.net, self.base, self.settings, stats.epoch, stats.record()
            )
            yield stats

    def close(self) -> None:
        self._lock.close()

    def __enter__(self) -> TrainingRun:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _matching_checkpoint(folder: Path, settings: TrainSettings) -> TrainerState | None:
    checkpoint = load_checkpoint(folder)
    if checkpoint is None:
        if (folder / MODEL_FILE).exists():
            raise CheckpointError(
                f"{folder.name} is a trained model without a checkpoint to resume: choose another name, "
                "or --restart to train it again from the start"
            )
        return None
    saved = TrainSettings.from_record(checkpoint.record["settings"])
    differences = saved.differences(settings)
    if differences:
        raise CheckpointError(
            f"{folder.name} was trained with other settings ({'; '.join(differences)}): run the same "
            "command to resume, choose another name, or --restart to train it again from the start"
        )
    if settings.epochs < checkpoint.record["epoch"]:
        raise CheckpointError(
            f"{folder.name} has already been trained for {checkpoint.record['epoch']} epochs; "
            f"--epochs {settings.epochs} cannot take it back"
        )
    return checkpoint


def _first_whitening(
    net: DescriptorNet,
    images: TrainingImages,
    base: ModelConfig,
    settings: TrainSettings,
    progress: Progress | None,
) -> nn.Linear:
    def counted(done: int, total: int) -> None:
        if progress is not None:
            progress(TrainProgress(0, "whiten", done, total))

    rng = np.random.default_rng([settings.seed, 1])
    return initial_whitening(
        net,
        images.paths,
        images.labels,
        base.preprocess,
        settings.imsize,
        settings.pool_size,
        rng,
        pca=settings.unlabelled,
        progress=counted,
    )


def _published(folder: Path, trainer: Trainer, base: ModelConfig) -> ModelConfig:
    """The published model of the resumed epoch, published again when a crash left it behind."""
    if published_epoch(folder) != trainer.epoch:
        last = trainer.history[-1] if trainer.history else None
        return publish_model(folder, trainer.net, base, trainer.settings, trainer.epoch, last)
    return read_local_model(folder)


__all__ = ["TrainingRun", "training_net", "tuple_source"]
