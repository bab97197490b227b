"""`lookalike train`: fine-tune a descriptor network on a folder; the result is the model `-m NAME`."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import typer
from rich.progress import Progress

from lookalike.cli.common import (
    console,
    errors,
    lines_wanted,
    print_json,
    progress_bar,
    reported_errors,
    wants_progress,
)
from lookalike.cli.options import one_of
from lookalike.train.loop import EpochStats, TrainProgress
from lookalike.train.losses import ContrastiveLoss, TripletLoss
from lookalike.train.run import TrainingRun
from lookalike.train.settings import LOSSES, POSITIVE_RULES, PRECISIONS, TrainSettings

STAGES = {"whiten": "fitting the whitening layer", "describe": "describing the pool", "train": "training"}


def _emit(record: dict) -> None:
    print_json(record)
    sys.stdout.flush()


def _start_record(run: TrainingRun) -> dict:
    images = run.images
    return {
        "event": "start",
        "name": run.name,
        "folder": str(run.folder),
        "backbone": run.base.name,
        "loss": run.settings.loss,
        "images": len(images),
        "classes": len(images.classes),
        "skipped": [{"path": str(p), "error": reason} for p, reason in images.skipped],
        "resumed_from": run.resumed_from,
        "epochs": run.settings.epochs,
    }


def _start_line(run: TrainingRun) -> str:
    images, settings = run.images, run.settings
    kind = "photos" if settings.unlabelled else f"images of {len(images.classes)} classes"
    resumed = f", resuming after epoch {run.resumed_from}" if run.resumed_from else ""
    return f"training {run.name} from {run.base.name} with {settings.loss} on {len(images)} {kind}{resumed}"


def _epoch_line(stats: EpochStats, epochs: int) -> str:
    return (
        f"epoch {stats.epoch}/{epochs}: loss {stats.loss:.4g}, positives at {stats.positive_distance:.3f}, "
        f"negatives at {stats.negative_distance:.3f}, {stats.active:.0%} of {stats.tuples} tuples active, "
        f"{stats.train_images_per_second:.1f} img/s training, {stats.describe_images_per_second:.1f} img/s "
        f"describing ({stats.precision})"
    )


def _progress_updater(bar: Progress, epochs: int) -> Callable[[TrainProgress], None]:
    task = bar.add_task("starting", total=None, rate="")

    def update(event: TrainProgress) -> None:
        epoch = f"epoch {event.epoch}/{epochs} " if event.epoch else ""
        loss = f"loss {event.loss:.4g}" if event.loss is not None else ""
        bar.update(task, description=epoch + STAGES.get(event.stage, event.stage), total=event.total,
                   completed=event.done, rate=loss)  # fmt: skip

    return update


def train(
    data: Path = typer.Option(
        ...,
        "--data",
        help="Labelled folder (class = sub-folder) or CSV of path,label rows; any folder of photos with "
        "--unlabelled.",
    ),
    name: str = typer.Option(..., "--name", help="Name of the trained model: `-m NAME` afterwards."),
    backbone: str = typer.Option(TrainSettings.backbone, "--backbone", help="Registry model to start from."),
    loss: str = typer.Option(
        TrainSettings.loss,
        "--loss",
        callback=one_of(tuple(LOSSES)),
        help="contrastive, triplet, ap (listwise average precision) or sos (triplet + second-order similarity).",
    ),
    margin: float = typer.Option(
        TrainSettings.margin,
        "--margin",
        help=f"Loss margin (default: contrastive {ContrastiveLoss().margin:g}, triplet and sos "
        f"{TripletLoss().margin:g}).",
    ),
    sos_weight: float = typer.Option(
        TrainSettings.sos_weight, "--sos-weight", help="λ of the second-order similarity term (sos)."
    ),
    ap_bins: int = typer.Option(TrainSettings.ap_bins, "--ap-bins", help="Quantisation bins of the ap loss."),
    soa: bool = typer.Option(TrainSettings.soa, "--soa", help="Add a second-order attention block."),
    whiten_layer: bool = typer.Option(
        TrainSettings.whiten_layer, "--whiten-layer", help="Add an end-to-end whitening layer."
    ),
    unlabelled: bool = typer.Option(
        TrainSettings.unlabelled,
        "--unlabelled",
        help="Every photo its own class; positives are strong augmentations of it.",
    ),
    epochs: int = typer.Option(
        TrainSettings.epochs, "--epochs", help="Epochs in all (may grow on resuming)."
    ),
    imsize: int = typer.Option(TrainSettings.imsize, "--imsize", help="Long side of training images."),
    negatives: int = typer.Option(TrainSettings.negatives, "--negatives", help="Hard negatives per tuple."),
    queries: int = typer.Option(TrainSettings.query_count, "--queries", help="Tuples per epoch."),
    pool: int = typer.Option(
        TrainSettings.pool_size, "--pool", help="Images negatives are mined from, per epoch."
    ),
    batch: int = typer.Option(TrainSettings.batch_tuples, "--batch", help="Tuples per optimiser step."),
    freeze: int = typer.Option(
        TrainSettings.freeze, "--freeze", help="Backbone stages left frozen, input side first."
    ),
    lr: float = typer.Option(TrainSettings.lr, "--lr", help="Adam's learning rate."),
    weight_decay: float = typer.Option(
        TrainSettings.weight_decay, "--weight-decay", help="Adam's weight decay."
    ),
    lr_decay: float = typer.Option(
        TrainSettings.lr_decay,
        "--lr-decay",
        help="The rate is multiplied by exp(−LR_DECAY) after each epoch.",
    ),
    positives: str = typer.Option(
        TrainSettings.positives,
        "--positives",
        callback=one_of(POSITIVE_RULES),
        help="nearest (the query's most similar classmate) or random.",
    ),
    seed: int = typer.Option(TrainSettings.seed, "--seed"),
    precision: str = typer.Option(
        TrainSettings.precision,
        "--precision",
        callback=one_of(PRECISIONS),
        help="auto (bf16 where the CPU has it natively and the loss agrees with fp32), fp32 or bf16.",
    ),
    restart: bool = typer.Option(False, "--restart", help="Discard NAME's checkpoint and start again."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar, no summary."),
    as_json: bool = typer.Option(False, "--json", help="One JSON line per epoch (what a pipe gets)."),
) -> None:
    """Fine-tune BACKBONE on a folder with hard negatives mined every epoch; each epoch is checkpointed
    (re-run the same command to resume) and published as the local model NAME."""
    with reported_errors():
        settings = TrainSettings(
            data=str(data),
            backbone=backbone,
            loss=loss,
            margin=margin,
            sos_weight=sos_weight,
            ap_bins=ap_bins,
            negatives=negatives,
            query_count=queries,
            pool_size=pool,
            epochs=epochs,
            imsize=imsize,
            lr=lr,
            weight_decay=weight_decay,
            lr_decay=lr_decay,
            batch_tuples=batch,
            freeze=freeze,
            soa=soa,
            whiten_layer=whiten_layer,
            unlabelled=unlabelled,
            positives=positives,
            precision=precision,
            seed=seed,
        )
        as_lines = lines_wanted(as_json) and not quiet
        with progress_bar(wants_progress(quiet, as_json)) as bar:
            update = _progress_updater(bar, epochs) if bar is not None else None
            say = bar.console.print if bar is not None else console.print
            with TrainingRun.open(settings, name, restart=restart, progress=update) as run:
                if as_lines:
                    _emit(_start_record(run))
                elif not quiet:
                    say(_start_line(run), highlight=False)
                    for skipped, reason in run.images.skipped:
                        errors.print(f"[yellow]skipped[/] {skipped}: {reason}", highlight=False)
                for stats in run.epochs(update):
                    if as_lines:
                        _emit({"event": "epoch", "name": run.name, **stats.record()})
                    elif not quiet:
                        say(_epoch_line(stats, epochs), highlight=False)
                        for left_out, reason in stats.skipped:
                            errors.print(f"[yellow]left out[/] {left_out}: {reason}", highlight=False)
                if as_lines:
                    _emit(
                        {
                            "event": "done",
                            "name": run.name,
                            "epochs": run.trainer.epoch,
                            "folder": str(run.folder),
                        }
                    )
                elif not quiet:
                    say(f"{run.name} is ready: use it as `-m {run.name}`", highlight=False)
