"""Fine-tuning on a CPU (issue 13): held-out Caltech-101 mAP before and after, a row per loss ± SOA ± an
end-to-end whitening layer with its training time; copy-detection recall@1 before and after
self-supervised fine-tuning; training (forward + backward) beside inference images/s in the same run.

Labelled protocol: ``lookalike.evaluate.protocols.caltech101(split="heldout", seed=S)`` splits the object
classes into two seeded halves. Training sees one half only (at most ``--per-class`` images of each class,
seeded, as a ``path,label`` CSV); evaluation is the other, unseen half: every object image a query against
every image of those classes plus every ``BACKGROUND_Google`` distractor (itself excluded), mAP of GeM
single-scale descriptors at ``--eval-imsize``, raw and with post-hoc learned whitening fitted on the
training half (``lookalike.evaluate.run.evaluate``). Every variant starts from the same base model and seed
and trains for ``--epochs`` epochs or until ``--budget-minutes`` of training have passed (the epoch under
way finishes), so a row says what an hour of a 2-core CPU buys.

Unlabelled protocol (copy detection): ``--copies`` seeded object images of the held-out half are edited
with strong augmentations (``lookalike.train.augment``, seeds disjoint from training's) and searched among
the held-out images and the distractors; recall@1 is the fraction whose first hit is the photo it was made
from. Self-supervised training (``--unlabelled``, every photo its own class) uses the training half's
images without their labels.

    .venv/bin/python benchmarks/finetune.py [--data ../shared/data/caltech101] [--model efficientnet-lite0.imagenet]
        [--losses contrastive,triplet,ap,sos] [--soa off,on] [--whiten off,on] [--no-unlabelled]
        [--epochs 10] [--budget-minutes 60] [--per-class 30] [--imsize 362] [--eval-imsize 362]
        [--queries 300] [--pool 1500] [--negatives 5] [--freeze 0] [--lr 1e-5] [--copies 300] [--seed 0]
        [--out benchmarks/results/finetune]
    .venv/bin/python benchmarks/finetune.py --smoke     # the whole pipeline on the bundled photos, < 2 minutes

The off-the-shelf model is measured in the real ``LOOKALIKE_HOME``, so its evaluation descriptors are
cached for the next run; models are trained in a temporary one (its weights cache links to the real one's
base model) and deleted after they are measured, so nothing is left in the user's registry. With every default,
16 labelled variants and one unlabelled: budget up to 17 hours; choose rows with ``--losses``, ``--soa``,
``--whiten``.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shutil
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lookalike.evaluate import protocols
from lookalike.evaluate.extraction import extract_variants
from lookalike.evaluate.protocols import CALTECH_DISTRACTOR, EvalSet
from lookalike.evaluate.run import Variant, evaluate
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.images import load_image, resize_max_side
from lookalike.registry import get_model_config
from lookalike.train.augment import strong_augment
from lookalike.train.run import TrainingRun
from lookalike.train.settings import TrainSettings
from lookalike.weights import cache_path
from report import command_line, write_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SAMPLE = ROOT / "src" / "lookalike" / "sample"
COPY_SEED_OFFSET = 10_000  # copy-detection edits draw from seeds training never uses
SMOKE = {
    "model": "efficientnet-lite0.imagenet", "losses": "sos", "soa": "off,on", "whiten": "off,on",
    "epochs": 1, "per_class": 4, "imsize": 64, "eval_imsize": 96, "queries": 8, "pool": 16,
    "negatives": 2, "copies": 8,
}  # fmt: skip


@dataclass(frozen=True)
class Row:
    name: str
    loss: str
    soa: bool
    whiten: bool
    unlabelled: bool = False


def base_home(home: Path, model: str) -> None:
    """A LOOKALIKE_HOME whose weights cache links to the real one's ``model``."""
    real = cache_path(get_model_config(model))
    (home / "weights").mkdir(parents=True)
    if real.exists():
        (home / "weights" / real.name).symlink_to(real.resolve())
    os.environ["LOOKALIKE_HOME"] = str(home)


def smoke_dataset(into: Path) -> Path:
    """A Caltech-101-shaped folder from the bundled photos: 8 classes of 4 versions, 4 distractors."""
    photos = [
        "astronaut",
        "cat",
        "cells",
        "coffee",
        "hubble",
        "rocket",
        "motorcycle-left",
        "motorcycle-right",
    ]
    for name in photos:
        image = resize_max_side(load_image(SAMPLE / f"{name}.jpg"), 160)
        (into / name).mkdir(parents=True)
        width, height = image.size
        versions = {
            "whole": image,
            "mirror": image.transpose(Image.Transpose.FLIP_LEFT_RIGHT),
            "crop": image.crop((width // 8, height // 8, width - width // 8, height - height // 8)),
            "edit": strong_augment(image, 1),
        }
        for kind, version in versions.items():
            version.save(into / name / f"{kind}.jpg", quality=90)
    rng = np.random.default_rng(0)
    (into / CALTECH_DISTRACTOR).mkdir()
    for i in range(4):
        noise = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
        Image.fromarray(noise).save(into / CALTECH_DISTRACTOR / f"{i}.jpg")
    return into


def training_csv(evalset: EvalSet, per_class: int, seed: int, path: Path) -> int:
    """At most ``per_class`` seeded images of every training class as ``path,label`` rows; how many."""
    rng = np.random.default_rng(seed)
    members: dict[str, list[Path]] = defaultdict(list)
    for image, label in zip(evalset.train, evalset.train_labels, strict=True):
        members[label].append(image)
    rows = []
    for label in sorted(members):
        chosen = sorted(rng.choice(len(members[label]), min(per_class, len(members[label])), replace=False))
        rows += [(str(members[label][i].resolve()), label) for i in chosen]
    with path.open("w", newline="") as handle:
        csv.writer(handle).writerows([("path", "label"), *rows])
    return len(rows)


def unlabelled_folder(csv_path: Path, into: Path) -> Path:
    """The training CSV's images as one flat folder of links: no labels left."""
    into.mkdir(parents=True)
    with csv_path.open(newline="") as handle:
        for i, (image, _) in enumerate(list(csv.reader(handle))[1:]):
            (into / f"{i:05d}{Path(image).suffix}").symlink_to(image)
    return into


def heldout_map(evalset: EvalSet, model: str, imsize: int, learned: bool = True) -> dict[str, float]:
    variants = [Variant("gem"), *([Variant("gem", whitening="learned")] if learned else [])]
    results = evaluate(evalset, model, variants, imsize, precision="fp32", scales=(1.0,))
    plain = results[0]
    return {"map": plain.map, "map_learned": results[1].map if learned else float("nan"),
            "mp@1": plain.mp_at_k[1], "extract_ms_per_image": plain.extract_ms_per_image}  # fmt: skip


def copy_set(evalset: EvalSet, copies: int, seed: int, into: Path) -> tuple[list[Path], np.ndarray]:
    """``copies`` strong edits of seeded held-out object images and the database index of each source."""
    rng = np.random.default_rng(seed + COPY_SEED_OFFSET)
    ids = np.asarray(evalset.query_ids)
    sources = np.sort(rng.choice(ids, size=min(copies, ids.size), replace=False))
    into.mkdir(parents=True)
    paths = []
    for i, source in enumerate(sources):
        edited = strong_augment(
            load_image(evalset.images[source]), int(rng.integers(2**62)) + COPY_SEED_OFFSET
        )
        edited.save(into / f"{i:05d}.jpg", quality=90)
        paths.append(into / f"{i:05d}.jpg")
    return paths, sources


def recall_at_1(
    model: str, database: tuple[Path, ...], queries: list[Path], truth: np.ndarray, imsize: int
) -> float:
    """Recall@1 of GeM descriptors; the database's are those :func:`heldout_map` extracted (cached)."""
    extractor = Extractor(DescriptorSettings(model=model, imsize=imsize, scales=(1.0,), precision="fp32"))
    db = extract_variants(extractor, database)
    found = extract_variants(extractor, queries, use_cache=False)
    if db.failed.any() or found.failed.any():
        raise RuntimeError("an image of the copy-detection set could not be described")
    q, d = found.vectors["gem"][:, 0], db.vectors["gem"][:, 0]
    return float(np.mean(np.argmax(q @ d.T, axis=1) == truth))


def train(settings: TrainSettings, name: str, budget: float) -> dict[str, Any]:
    started = time.perf_counter()
    history = []
    with TrainingRun.open(settings, name, restart=True) as run:
        for stats in run.epochs():
            history.append(stats.record())
            print(f"  {name} epoch {stats.epoch}: loss {stats.loss:.4g}, {stats.train_images_per_second:.1f} "
                  f"img/s training, {stats.describe_images_per_second:.1f} img/s describing", flush=True)  # fmt: skip
            if time.perf_counter() - started > budget:
                break
    return {"epochs": len(history), "train_seconds": time.perf_counter() - started, "history": history}


def percent(value: float, signed: bool = False) -> str:
    """``value`` as a percentage for the table; a skipped measurement (NaN) as a dash."""
    if math.isnan(value):
        return "–"
    return f"{100 * value:+.2f}" if signed else f"{100 * value:.2f}"


def table(base: dict, rows: list[dict]) -> str:
    lines = [
        "| variant | epochs | training | mAP | Δ | mAP + learned w. | Δ | train img/s | describe img/s |",
        "|---|---|---|---|---|---|---|---|---|",
        f"| off-the-shelf | – | – | {percent(base['map'])} | | {percent(base['map_learned'])} | | | |",
    ]
    for r in rows:
        last = r["history"][-1] if r["history"] else {}
        lines.append(
            f"| {r['label']} | {r['epochs']} | {r['train_seconds'] / 60:.1f} min | {percent(r['map'])} | "
            f"{percent(r['map'] - base['map'], signed=True)} | {percent(r['map_learned'])} | "
            f"{percent(r['map_learned'] - base['map_learned'], signed=True)} | "
            f"{last.get('train_images_per_second', 0):.1f} | {last.get('describe_images_per_second', 0):.1f} |"
        )
    return "\n".join(lines)


def switch(text: str) -> list[bool]:
    return [{"off": False, "on": True}[part] for part in text.split(",")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "caltech101")
    parser.add_argument("--model", default="efficientnet-lite0.imagenet")
    parser.add_argument("--losses", default="contrastive,triplet,ap,sos")
    parser.add_argument("--soa", default="off,on")
    parser.add_argument("--whiten", default="off,on")
    parser.add_argument("--no-unlabelled", action="store_true")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--budget-minutes", type=float, default=60.0)
    parser.add_argument("--per-class", type=int, default=30)
    parser.add_argument("--imsize", type=int, default=TrainSettings.imsize)
    parser.add_argument("--eval-imsize", type=int, default=TrainSettings.imsize)
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--pool", type=int, default=1500)
    parser.add_argument("--negatives", type=int, default=TrainSettings.negatives)
    parser.add_argument("--freeze", type=int, default=TrainSettings.freeze)
    parser.add_argument("--lr", type=float, default=TrainSettings.lr)
    parser.add_argument("--copies", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "finetune")
    parser.add_argument(
        "--no-learned", action="store_true", help="Skip the post-hoc learned-whitening column."
    )
    parser.add_argument("--smoke", action="store_true", help="The bundled photos instead of Caltech-101.")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
        args.out = args.out.with_name(args.out.name + "-smoke")
    started = time.perf_counter()
    rows = [Row(f"{loss}{'-soa' if soa else ''}{'-w' if w else ''}", loss, soa, w)
            for loss, soa, w in product(args.losses.split(","), switch(args.soa), switch(args.whiten))]  # fmt: skip
    if not args.no_unlabelled:
        rows.append(Row("unlabelled", TrainSettings.loss, False, False, unlabelled=True))
    with tempfile.TemporaryDirectory(prefix="lookalike-finetune-") as scratch_name:
        scratch = Path(scratch_name)
        if args.smoke:  # the smoke set's descriptors stay in the scratch folder
            base_home(scratch / "home", args.model)
        data = smoke_dataset(scratch / "smoke") if args.smoke else args.data
        evalset = protocols.caltech101(data, split="heldout", seed=args.seed)
        count = training_csv(evalset, args.per_class, args.seed, scratch / "train.csv")
        copies, sources = copy_set(evalset, args.copies, args.seed, scratch / "copies")
        print(f"{count} training images; {evalset.query_count} held-out queries among {len(evalset.images)}; "
              f"{len(copies)} copies", flush=True)  # fmt: skip
        base = heldout_map(evalset, args.model, args.eval_imsize, not args.no_learned)
        if not args.no_unlabelled:
            base["recall@1"] = recall_at_1(args.model, evalset.images, copies, sources, args.eval_imsize)
        if not args.smoke:  # the off-the-shelf model was measured in the real home: its eval cache is reused
            base_home(scratch / "home", args.model)
        settings = TrainSettings(
            data=str(scratch / "train.csv"), backbone=args.model, epochs=args.epochs, imsize=args.imsize,
            query_count=args.queries, pool_size=args.pool, negatives=args.negatives, freeze=args.freeze,
            lr=args.lr, seed=args.seed,
        )  # fmt: skip
        measured = []
        for row in rows:
            data_path = (
                unlabelled_folder(scratch / "train.csv", scratch / "unlabelled") if row.unlabelled else None
            )
            chosen = replace(settings, loss=row.loss, soa=row.soa, whiten_layer=row.whiten,
                             unlabelled=row.unlabelled, data=str(data_path or settings.data))  # fmt: skip
            name = f"bench-{row.name}"
            record = {"label": row.name, **train(chosen, name, 60 * args.budget_minutes)}
            record.update(heldout_map(evalset, name, args.eval_imsize, not args.no_learned))
            if row.unlabelled:
                record["recall@1"] = recall_at_1(name, evalset.images, copies, sources, args.eval_imsize)
            measured.append(record)
            shutil.rmtree(scratch / "home" / "models" / name, ignore_errors=True)
            (scratch / "home" / "weights" / f"{name}.safetensors").unlink(missing_ok=True)
    labelled = [r for r in measured if r["label"] != "unlabelled"]
    unlabelled = [r for r in measured if r["label"] == "unlabelled"]
    header = (
        f"{command_line(started, minutes=True)} {args.model}, training at {args.imsize} px, "
        f"evaluation at {args.eval_imsize} px; {count} training images of the seeded half of the classes."
    )
    text = header + "\n\n" + table(base, labelled) + "\n"
    for r in unlabelled:
        text += (
            f"\nCopy detection ({len(copies)} strong edits of held-out images): recall@1 "
            f"{100 * base['recall@1']:.1f} % off the shelf → {100 * r['recall@1']:.1f} % after {r['epochs']} "
            f"self-supervised epochs ({r['train_seconds'] / 60:.1f} min); held-out mAP {100 * r['map']:.2f}.\n"
        )
    write_report(args.out, text, {"base": base, "rows": measured, "args": vars(args)}, default=str)
    print(text)


if __name__ == "__main__":
    main()
