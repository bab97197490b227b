"""Index Caltech-101 end to end and compare with the pure extraction rate, measured in the same run.

Figures: (1) end-to-end indexing images/s (walk, hash, decode, extract, SQLite + vector commits) against
the rate of the same extractor on images already decoded in memory (a seeded random subset); (2) the
re-run on the unchanged folder (seconds, images decoded); (3) query latency excluding the query's own
extraction (median and p99 over stored descriptors of indexed images).

    .venv/bin/python benchmarks/index_caltech.py [--data ../shared/data/caltech101] [--subset 600]
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from lookalike import images as images_module
from lookalike.collection import Collection
from lookalike.cpu import cpu_info
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.images import load_image
from lookalike.walk import walk_images

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "caltech101"


def pure_extraction_rate(extractor: Extractor, paths: list[Path]) -> float:
    """Images/s of the extractor alone on images decoded beforehand (one at a time, as indexing sees them)."""
    decoded = [load_image(p) for p in paths]
    extractor.describe(decoded[0])
    started = time.perf_counter()
    for image in decoded:
        extractor.describe(image)
    return len(decoded) / (time.perf_counter() - started)


def count_decodes() -> list[int]:
    counter = [0]
    original = images_module.load_image

    def counting(*args, **kwargs):
        counter[0] += 1
        return original(*args, **kwargs)

    images_module.load_image = counting
    import lookalike.extract as extract_module

    extract_module.load_image = counting
    return counter


def query_latency(collection: Collection, queries: int = 300) -> dict[str, float]:
    ids, raw = collection.raw_vectors()
    rng = np.random.default_rng(0)
    chosen = rng.choice(len(ids), size=min(queries, len(ids)), replace=False)
    collection.search_vectors(raw[chosen[0]][None], k=30)
    timings = []
    for row in chosen:
        started = time.perf_counter()
        collection.search_vectors(raw[row][None], k=30)
        timings.append((time.perf_counter() - started) * 1000)
    timings.sort()
    return {"median_ms": statistics.median(timings), "p99_ms": timings[int(0.99 * (len(timings) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--subset", type=int, default=600, help="Images for the pure extraction rate.")
    parser.add_argument("--imsize", type=int, default=1024)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "index_caltech.json")
    args = parser.parse_args()

    settings = DescriptorSettings(imsize=args.imsize, precision=args.precision)
    paths = list(walk_images(args.data))
    work = Path(tempfile.mkdtemp(prefix="lookalike-bench-"))
    try:
        extractor = Extractor(settings)
        subset = random.Random(0).sample(paths, min(args.subset, len(paths)))
        pure = pure_extraction_rate(extractor, subset)
        print(f"pure extraction: {pure:.1f} images/s on {len(subset)} decoded images", flush=True)

        collection = Collection.create(work / "c", settings, root=args.data)
        collection._extractor = extractor
        report = collection.sync()
        described = report.indexed + len(report.failed)
        end_to_end = described / report.seconds
        print(
            f"index: {report.indexed} indexed, {report.reused} reused, {len(report.failed)} failed in "
            f"{report.seconds:.1f} s = {end_to_end:.1f} images/s ({end_to_end / pure:.0%} of pure)",
            flush=True,
        )

        decodes = count_decodes()
        rerun = collection.sync()
        print(
            f"re-run: {rerun.seconds:.2f} s, {rerun.unchanged} unchanged, {decodes[0]} images decoded",
            flush=True,
        )
        latency = query_latency(collection)
        print(
            f"query (k=30, excluding extraction): median {latency['median_ms']:.2f} ms, "
            f"p99 {latency['p99_ms']:.2f} ms over {collection.info().images} images",
            flush=True,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)

    record = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu": cpu_info().describe(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "precision": extractor.precision,
        "images": len(paths),
        "pure_images_per_second": pure,
        "index_images_per_second": end_to_end,
        "index_fraction_of_pure": end_to_end / pure,
        "index_seconds": report.seconds,
        "failed": report.failed,
        "rerun_seconds": rerun.seconds,
        "rerun_decoded": decodes[0],
        "query_latency": latency,
        "targets": {
            "index >= 90% of pure": end_to_end / pure >= 0.9,
            "re-run <= 5 s, nothing decoded": rerun.seconds <= 5 and decodes[0] == 0,
            "query <= 10 ms": latency["median_ms"] <= 10,
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1))
    for target, met in record["targets"].items():
        print(f"{'PASS' if met else 'MISS'}  {target}")


if __name__ == "__main__":
    main()
