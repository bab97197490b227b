"""Multi-scale GeM before and after the scale-combination fix of issue 12, from one extraction.

Before the fix, evaluation combined a GeM descriptor's scales with the exponent of the model's *own* pooling:
on the ImageNet backbones, whose default is R-MAC, that was a plain mean (power 1), while `lookalike index
--pooling gem --scales ms` combines with GeM's p (3). Every ``gem | multi`` row of the retrieval tables was
measured that way. This script extracts once (cached, as ``eval_table.py`` does) and scores the multi-scale
GeM variants with the old rule and with the fixed one, plus two controls that must not move (GeM single
scale, R-MAC multi-scale).

The full Caltech-101 tables take hours of extraction on 2 cores, so Caltech-101 is a seeded subset: up to
``--per-class`` images of every object class and ``--distractors`` BACKGROUND_Google images, linked into a
temporary folder and split by the published ``heldout`` protocol (the same seeded class halves, since every
class is present). The UKBench and Holidays samples are used whole.

    .venv/bin/python benchmarks/gem_multiscale.py [--models resnet50.keras-imagenet,efficientnet-lite0.imagenet]
        [--per-class 20] [--distractors 100] [--seed 0] [--imsize 1024] [--out benchmarks/results/gem_multiscale]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from unittest import mock

import numpy as np

import lookalike.evaluate.run as run
from lookalike.evaluate import protocols
from lookalike.evaluate.protocols import CALTECH_DISTRACTOR, EvalSet
from lookalike.evaluate.run import EvalResult, Variant, evaluate
from lookalike.extract import Extractor, scale_combination_power
from lookalike.pooling import gem_power
from lookalike.walk import walk_images
from report import command_line, write_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
CHANGED = [Variant("gem", True, w) for w in ("none", "pca", "learned")]
CONTROLS = [Variant("gem", False, "none"), Variant("rmac", True, "none")]


def pre_fix_power(pooling: str, extractor: Extractor) -> float:
    """``evaluate/extraction.multiscale_power`` as it was before issue 12: the extractor's own pool's p."""
    p = gem_power(extractor.net.pool) if pooling == "gem" else None
    return scale_combination_power(pooling, p or 1.0, extractor.net.whiten is not None)


@contextmanager
def pre_fix_rule() -> Iterator[None]:
    with mock.patch.object(run, "multiscale_power", pre_fix_power):
        yield


def caltech_subset(root: Path, into: Path, per_class: int, distractors: int, seed: int) -> Path:
    """Symlinks to a seeded sample of every class folder of ``root`` (all of a smaller class)."""
    rng = np.random.default_rng(seed)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(walk_images(folder))
        count = min(distractors if folder.name == CALTECH_DISTRACTOR else per_class, len(files))
        (into / folder.name).mkdir(parents=True)
        for index in sorted(rng.choice(len(files), count, replace=False)):
            (into / folder.name / files[index].name).symlink_to(files[index].resolve())
    return into


def table(rows: list[tuple[str, EvalResult, EvalResult]]) -> str:
    lines = [
        "| protocol | model | variant | mAP before → after | Δ mAP | mP@1 before → after | mP@10 before → after |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, before, after in rows:
        v = after.variant
        label = f"{v.pooling} {'multi' if v.multiscale else 'single'} {v.whitening}"
        lines.append(
            f"| {name} | {after.model} | {label} | {100 * before.map:.2f} → {100 * after.map:.2f} | "
            f"{100 * (after.map - before.map):+.2f} | {100 * before.mp_at_k[1]:.1f} → {100 * after.mp_at_k[1]:.1f} | "
            f"{100 * before.mp_at_k[10]:.1f} → {100 * after.mp_at_k[10]:.1f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50.keras-imagenet,efficientnet-lite0.imagenet")
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--distractors", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--imsize", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gem_multiscale")
    args = parser.parse_args()
    started = time.perf_counter()
    rows: list[tuple[str, EvalResult, EvalResult]] = []
    with tempfile.TemporaryDirectory() as scratch:
        subset = caltech_subset(
            DATA / "caltech101", Path(scratch) / "caltech101", args.per_class, args.distractors, args.seed
        )
        caltech = protocols.caltech101(subset, split="heldout")
        evalsets: list[tuple[str, EvalSet, list[Variant]]] = [
            ("Caltech-101 subset", caltech, CHANGED + CONTROLS),
            ("UKBench sample", protocols.ukbench(DATA / "ukbench-sample"), CHANGED[:1] + CONTROLS),
            ("Holidays sample", protocols.holidays(DATA / "holidays-sample"), CHANGED[:1] + CONTROLS),
        ]
        sizes = (
            f"Caltech-101 subset: {caltech.query_count} queries, {len(caltech.images)} images, "
            f"{len(caltech.train)} for whitening."
        )
        for model in args.models.split(","):

            def progress(stage: str, done: int, total: int, model: str = model) -> None:
                if done % 250 == 0 or done == total:
                    elapsed = time.perf_counter() - started
                    print(f"  {model} {stage}: {done}/{total} ({elapsed:.0f} s)", flush=True)

            for name, evalset, variants in evalsets:
                with pre_fix_rule():
                    before = evaluate(evalset, model, variants, args.imsize, progress=progress)
                after = evaluate(evalset, model, variants, args.imsize)  # the same cached descriptors
                rows += [(name, b, a) for b, a in zip(before, after, strict=True)]
    text = f"{command_line(started)} {sizes}\n\n" + table(rows) + "\n"
    records = [{"protocol": name, "before": b.as_dict(), "after": a.as_dict()} for name, b, a in rows]
    write_report(args.out, text, records)
    print(text)


if __name__ == "__main__":
    main()
