"""The results table: backbones × pooling × whitening × single/multi-scale on Caltech-101 class retrieval,
plus the UKBench and Holidays samples — the analogue of the seed thesis' tables 4.4–4.11.

Caltech-101 protocol ``heldout``: a seeded half of the object classes fits the whitening (PCA, or learned
from same-class pairs); every image of the other classes is a query against all images of those classes
plus the 466 BACKGROUND_Google distractors (itself excluded). Extract time is per image at the setting's
scales: backbone plus that pooling, decoding excluded. Descriptors are cached, so re-running is cheap.

    .venv/bin/python benchmarks/eval_table.py [--models resnet50.keras-imagenet,efficientnet-lite0.imagenet]
        [--single-scale]   # only scale 1: a third of the extraction, for the slow backbones
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from lookalike.evaluate import protocols
from lookalike.evaluate.run import EvalResult, all_variants, evaluate
from lookalike.extract import MULTI_SCALES
from lookalike.registry import get_model_config
from lookalike.weights import cache_path
from report import command_line, write_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_MODELS = "resnet50.keras-imagenet,efficientnet-lite0.imagenet,resnet152.resmem"


def markdown(title: str, results: list[EvalResult], ns: bool = False) -> str:
    head = "| model | pooling | scales | whitening | mAP | mP@1 | mP@5 | mP@10 |" + (" N-S |" if ns else "")
    head += " ms/image |"
    lines = [f"#### {title}", "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        v = r.variant
        row = f"| {r.model} | {v.pooling} | {'multi' if v.multiscale else 'single'} | {v.whitening} | "
        row += f"{100 * r.map:.2f} | " + " | ".join(f"{100 * r.mp_at_k[k]:.1f}" for k in (1, 5, 10)) + " |"
        if ns:
            row += f" {r.ukbench_ns:.2f} |"
        lines.append(row + f" {r.extract_ms_per_image:.0f} |")
    return "\n".join(lines)


def best(results: list[EvalResult]) -> EvalResult:
    return max(results, key=lambda r: r.map)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--imsize", type=int, default=1024)
    parser.add_argument("--single-scale", action="store_true", help="Extract and score scale 1 only.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "eval_table")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if cache_path(get_model_config(m)).exists()]
    started = time.perf_counter()
    sections, records = [], []
    caltech = protocols.caltech101(DATA / "caltech101", split="heldout")
    small = [
        ("ukbench", protocols.ukbench(DATA / "ukbench-sample")),
        ("holidays", protocols.holidays(DATA / "holidays-sample")),
    ]
    for model in models:

        def progress(stage: str, done: int, total: int, model: str = model) -> None:
            if done % 500 == 0 or done == total:
                print(
                    f"  {model} {stage}: {done}/{total} ({time.perf_counter() - started:.0f} s)", flush=True
                )

        multiscale = not args.single_scale
        scales = MULTI_SCALES if multiscale else (1.0,)
        variants = all_variants(multiscale=multiscale)
        results = evaluate(caltech, model, variants, args.imsize, scales=scales, progress=progress)
        sections.append(
            markdown(
                f"Caltech-101 heldout — {model} ({caltech.query_count} queries, {len(caltech.images)} images)",
                results,
            )
        )
        records += [r.as_dict() for r in results]
        top = best(results)
        print(f"{model}: best {top.variant.label} mAP {100 * top.map:.2f}", flush=True)
        for name, evalset in small:
            small_variants = [v for v in variants if v.whitening == "none"]
            small_results = evaluate(evalset, model, small_variants, args.imsize, scales=scales)
            sections.append(markdown(f"{name} sample — {model}", small_results, ns=name == "ukbench"))
            records += [r.as_dict() for r in small_results]
    text = command_line(started) + "\n\n" + "\n\n".join(sections) + "\n"
    write_report(args.out, text, records)
    print(text)


if __name__ == "__main__":
    main()
