"""Fine-tuning descriptor networks on a CPU (issue 13): losses, tuples and mining, trainable heads,
second-order attention and strong augmentation, and the loop built from them: :class:`Trainer` takes a loss
and a tuple source through its constructor; :class:`TrainingRun` is ``lookalike train`` (checkpoints,
resuming, the trained model published as a local registry entry).

The second-order attention block lives with the network (``lookalike.attention``) and is re-exported here.
"""

from __future__ import annotations

from lookalike.attention import (
    AttentiveBackbone,
    SecondOrderAttention,
    second_order_attention,
    with_attention,
)
from lookalike.errors import TrainingSetError
from lookalike.train.augment import (
    Augmentation,
    AugmentConfig,
    apply_augmentation,
    draw_augmentation,
    strong_augment,
)
from lookalike.train.checkpoint import load_checkpoint, save_checkpoint
from lookalike.train.heads import LearnableGeM, WhiteningLayer
from lookalike.train.loop import EpochStats, StepStats, Trainer, TrainerState, TrainProgress
from lookalike.train.losses import (
    ContrastiveLoss,
    ListwiseAPLoss,
    Loss,
    SOSLoss,
    Targets,
    TripletLoss,
    TripletSOSLoss,
    contrastive_loss,
    listwise_ap_loss,
    quantized_ap,
    sos_loss,
    triplet_loss,
)
from lookalike.train.publish import publish_model
from lookalike.train.run import TrainingRun
from lookalike.train.settings import LOSSES, TrainSettings, build_loss
from lookalike.train.sources import (
    AugmentedTuples,
    HardNegativeTuples,
    TupleSource,
    images_unlabelled,
    training_images,
)
from lookalike.train.tuples import (
    EpochSample,
    PositiveRule,
    TrainingImages,
    build_tuples,
    choose_positives,
    images_from_csv,
    images_from_folder,
    mine_hard_negatives,
    sample_epoch,
    sample_pool,
    tuple_targets,
)

__all__ = [
    "LOSSES",
    "AttentiveBackbone",
    "AugmentConfig",
    "Augmentation",
    "AugmentedTuples",
    "ContrastiveLoss",
    "EpochSample",
    "EpochStats",
    "HardNegativeTuples",
    "LearnableGeM",
    "ListwiseAPLoss",
    "Loss",
    "PositiveRule",
    "SOSLoss",
    "SecondOrderAttention",
    "StepStats",
    "Targets",
    "TrainProgress",
    "TrainSettings",
    "Trainer",
    "TrainerState",
    "TrainingImages",
    "TrainingRun",
    "TrainingSetError",
    "TripletLoss",
    "TripletSOSLoss",
    "TupleSource",
    "WhiteningLayer",
    "apply_augmentation",
    "build_loss",
    "build_tuples",
    "choose_positives",
    "contrastive_loss",
    "draw_augmentation",
    "images_from_csv",
    "images_from_folder",
    "images_unlabelled",
    "listwise_ap_loss",
    "load_checkpoint",
    "mine_hard_negatives",
    "publish_model",
    "quantized_ap",
    "sample_epoch",
    "sample_pool",
    "save_checkpoint",
    "second_order_attention",
    "sos_loss",
    "strong_augment",
    "training_images",
    "triplet_loss",
    "tuple_targets",
    "with_attention",
]
