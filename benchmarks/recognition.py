"""Recognition on Caltech-101 with distractors: the ladder from 1-NN to the pairwise verifier.

Protocols (``lookalike.recognize.protocol``): ``86.5%`` — every BACKGROUND_Google image (466) is a query,
plus 73 object images from 73 different classes (as Tini-GLD's 86.5 % distractors); ``50%`` — the same
distractors plus 466 object queries, round-robin over the classes. References: every other object image.
Hyper-parameters are chosen on validation folds drawn from the references only (pseudo-distractors are
held-out reference classes); the test queries are scored once per configuration and never used to choose.

Descriptors: GeM at the five scales (0.25, 0.5, 1/√2, 1, √2) of ``lookalike.recognize.DEFAULT_SCALES``, the
long side capped at ``--imsize`` (Caltech images are ~300×200 and are not upscaled at scale 1), extracted
in chunks through ``extract_variants`` and cached under ``$LOOKALIKE_HOME/eval-cache``. Local features
(SIFT) are cached under ``$LOOKALIKE_HOME/local-features``.

    nice -n 10 .venv/bin/python benchmarks/recognition.py [--models resnet50.keras-imagenet,...]
        [--imsize 1024] [--no-local] [--extract-only] [--out benchmarks/results/recognition]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from lookalike.cpu import cpu_info
from lookalike.evaluate.datasets import LabelledImages, labelled_folder
from lookalike.evaluate.extraction import extract_variants
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.recognize.multiscale import DEFAULT_SCALES

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "caltech101"
DEFAULT_MODELS = "resnet50.keras-imagenet,efficientnet-lite0.imagenet"
CHUNK = 256  # extract_variants decodes its whole list ahead of the network: chunks bound the memory


def log(message: str, started: float) -> None:
    print(f"[{time.perf_counter() - started:6.0f} s] {message}", flush=True)


def caltech_descriptors(
    dataset: LabelledImages, model: str, imsize: int, started: float
) -> tuple[np.ndarray, np.ndarray]:
    """GeM descriptors (N, S, D) of every image at DEFAULT_SCALES, and the mask of unreadable images."""
    extractor = Extractor(DescriptorSettings(model=model, scales=DEFAULT_SCALES, imsize=imsize))
    paths = list(dataset.paths)
    vectors, failed = [], []
    for start in range(0, len(paths), CHUNK):
        chunk = extract_variants(extractor, paths[start : start + CHUNK])
        vectors.append(chunk.vectors["gem"])
        failed.append(chunk.failed)
        log(f"{model}: descriptors {min(start + CHUNK, len(paths))}/{len(paths)}", started)
    return np.concatenate(vectors), np.concatenate(failed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--imsize", type=int, default=1024)
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--no-local", action="store_true", help="Skip SIFT (verifier without inliers).")
    parser.add_argument("--extract-only", action="store_true", help="Only fill the descriptor cache.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "recognition")
    args = parser.parse_args()
    started = time.perf_counter()
    dataset = labelled_folder(args.data, distractor="BACKGROUND_Google")
    for model in args.models.split(","):
        descriptors, failed = caltech_descriptors(dataset, model, args.imsize, started)
        log(f"{model}: {descriptors.shape}, {int(failed.sum())} unreadable", started)
        if args.extract_only:
            continue


if __name__ == "__main__":
    main()
