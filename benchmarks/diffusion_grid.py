"""Diffusion's options chosen on classes the evaluation never sees: every option combination is scored on
the *training* half of the Caltech-101 class split (``protocols.caltech101("heldout", seed)``'s other
classes, each object image a query, itself excluded), then the best one and the published defaults on the
held-out half, beside αQE — so the held-out figure is not tuned on itself.

    .venv/bin/python benchmarks/diffusion_grid.py [--seed 0] [--out benchmarks/results/diffusion-grid]
"""

from __future__ import annotations

import argparse
import itertools
import time
from pathlib import Path

import numpy as np

from lookalike.evaluate import protocols
from lookalike.evaluate.metrics import compute_map
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.rerank import ArrayDatabase, parse_chain
from report import command_line, write_report
from rerank import DATA, ROOT, descriptors

GRID = {"k": (10, 50), "kq": (3, 10), "gamma": (1.0, 3.0), "alpha": (0.9, 0.99)}


def score(text: str, xb: np.ndarray, queries: np.ndarray, gnd: list) -> float:
    ranking = parse_chain(text).search(ArrayDatabase(xb), xb[queries], len(xb), own=queries)
    return compute_map(ranking.ids, gnd, kappas=(1,)).map


def training_half(evalset: protocols.EvalSet, rows: dict[Path, int], xall: np.ndarray) -> tuple:
    paths = list(evalset.train)
    labels = np.array(evalset.train_labels)
    xb = xall[[rows[p] for p in paths]]
    objects = np.flatnonzero([p.parent.name != protocols.CALTECH_DISTRACTOR for p in paths])
    gnd = []
    for q in objects:
        same = np.flatnonzero((labels == labels[q]) & (labels != protocols.CALTECH_DISTRACTOR))
        gnd.append({"ok": same[same != q], "junk": np.array([q])})
    return xb, objects, gnd


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "diffusion-grid")
    args = parser.parse_args()
    started = time.perf_counter()
    extractor = Extractor(DescriptorSettings())
    everything = protocols.caltech101(DATA / "caltech101", split="all")
    xall = descriptors(extractor, everything.images)
    rows = {p: i for i, p in enumerate(everything.images)}
    heldout = protocols.caltech101(DATA / "caltech101", split="heldout", seed=args.seed)
    xt, qt, gt = training_half(heldout, rows, xall)
    results = []
    for k, kq, gamma, alpha in itertools.product(*GRID.values()):
        text = f"diffusion:k={k},kq={kq},gamma={gamma},alpha={alpha}"
        results.append({"chain": text, "train_map": score(text, xt, qt, gt)})
        print(f"  {text:48s} training-half mAP {results[-1]['train_map']:.4f}", flush=True)
    best = max(results, key=lambda r: r["train_map"])["chain"]
    xh = xall[[rows[p] for p in heldout.images]]
    assert heldout.query_ids is not None
    final = {text: score(text, xh, heldout.query_ids, heldout.gnd)
             for text in ("none", "aqe", "diffusion", best, "dba,aqe", f"dba,{best}")}  # fmt: skip
    lines = [f"# Diffusion options\n\n{command_line(started, minutes=True)}\n",
             f"Best on the training half: `{best}`.\n", "| chain | held-out mAP |", "|---|---|"]  # fmt: skip
    lines += [f"| `{text}` | {value:.4f} |" for text, value in final.items()]
    text = "\n".join(lines) + "\n"
    print(text)
    write_report(args.out, text, {"grid": results, "heldout": final, "best": best})


if __name__ == "__main__":
    main()
