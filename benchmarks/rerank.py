"""Re-ranking (issue 14): what each re-ranker and chain does to finding *the same* photo, and to finding its
category, with the latency it adds and what local features cost.

Copies: ``--queries`` seeded photos of Caltech-101 (object classes) edited ``strong``-ly (cropped to
50–80 %, rotated ±20°, recoloured, halved, JPEG 30–60; :mod:`lookalike.evaluate.copies`) and
``--family-queries`` more per single edit family (crop, rotate, mirror, colour, blur, half, jpeg), each
searched among **all 9,144 photos** (the original is among them, as is every other photo of its class and
the clutter). Recall@1/10 and mAP (1 / rank of the original within the first 100) for every chain, and the
milliseconds a query takes through it (describing the query's local features included; the database's are
read from the cache the first pass fills — their cost per image and on disk is measured separately).

Classes: Caltech-101 held-out class retrieval mAP (``protocols.caltech101("heldout")``) for the expansion
and diffusion chains over every query; spatial verification on ``--class-queries`` seeded queries, against
no re-ranking on the same queries.

Small sets: the UKBench and Holidays samples (every image a query, itself excluded).

Descriptors: the product's default (``DescriptorSettings()``: ResNet-50 R-MAC, long side ≤ 1024, single
scale), cached in ``LOOKALIKE_HOME/eval-cache``; local features in ``LOOKALIKE_HOME/bench-local``.

    .venv/bin/python benchmarks/rerank.py [--only copies,classes,small,cost] [--queries 200]
        [--family-queries 30] [--class-queries 200] [--seed 0] [--out benchmarks/results/rerank]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.evaluate import protocols
from lookalike.evaluate.copies import EDITS, edited_copies, file_database, run_copies
from lookalike.evaluate.extraction import extract_variants
from lookalike.evaluate.metrics import compute_map
from lookalike.evaluate.protocols import CALTECH_DISTRACTOR, CALTECH_TWINS, EvalSet
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.home import lookalike_home
from lookalike.images import load_image
from lookalike.local import local_describer
from lookalike.rerank import parse_chain
from report import command_line, write_report

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
COPY_CHAINS = (
    "none", "aqe", "dba,aqe", "diffusion",
    "sv:top=20", "sv:top=50", "sv", "sv:keypoints=512", "sv:features=sift", "aqe,sv",
)  # fmt: skip
FAMILY_CHAINS = ("none", "aqe", "sv", "sv:mirror=true", "sv:features=sift")
CLASS_CHAINS = ("none", "aqe", "dba,aqe", "diffusion", "dba,diffusion")
SMALL_CHAINS = ("none", "aqe", "diffusion:k=5,kq=3", "sv:top=10", "sv:top=10,features=sift")


def descriptors(extractor: Extractor, paths: tuple[Path, ...]) -> np.ndarray:
    found = extract_variants(extractor, paths)
    if found.failed.any():
        print(f"  {int(found.failed.sum())} images could not be described (zero rows)", flush=True)
    return found.vectors[extractor.settings.pooling or "rmac"][:, 0]


def copies_benchmark(args: argparse.Namespace, extractor: Extractor) -> list[dict[str, Any]]:
    evalset = protocols.caltech101(args.data, split="all")
    paths = evalset.images
    objects = np.flatnonzero([p.parent.name != CALTECH_DISTRACTOR for p in paths])
    counts = {"strong": args.queries, **{f: args.family_queries for f in EDITS if f != "strong"}}
    copies = edited_copies(paths, counts, args.seed, lookalike_home() / "bench-copies" / f"seed{args.seed}",
                           eligible=objects, twins=CALTECH_TWINS)  # fmt: skip
    print(f"{len(copies.paths)} edited copies among {len(paths)} photos", flush=True)
    xb = descriptors(extractor, paths)
    xq = descriptors(extractor, copies.paths)
    database = file_database(xb, paths, lookalike_home() / "bench-local")
    warm_local_features(database, xq, depth=100)
    strong = np.array(copies.edits) == "strong"
    rows = []
    for subset, chains in (("strong", COPY_CHAINS), ("families", FAMILY_CHAINS)):
        chosen = np.flatnonzero(strong if subset == "strong" else ~strong)
        part = copies.subset(chosen)
        for text in chains:
            if text.startswith("sv") or ",sv" in text:
                run_copies(parse_chain(text), database, xq[chosen[:1]], part.subset(np.arange(1)))  # warm-up
            result = run_copies(parse_chain(text), database, xq[chosen], part)
            rows.append({"set": subset, **result.__dict__})
            print(f"  {subset:8s} {text:22s} R@1 {result.recall_at_1:.3f} R@10 {result.recall_at_10:.3f} "
                  f"mAP {result.map:.3f} {result.ms_per_query:8.1f} ms/query "
                  + " ".join(f"{k} {v:.2f}" for k, v in result.per_edit.items()), flush=True)  # fmt: skip
    return rows


def warm_local_features(database: Any, xq: np.ndarray, depth: int) -> None:
    """Compute (or read from the cache) the local features of every candidate the first search shortlists,
    so the timed passes measure re-ranking with stored features, as in a collection indexed with them."""
    _, ids = database.search(xq, depth)
    wanted = [int(i) for i in np.unique(ids) if i >= 0]
    for name in ("xfeat", "sift"):
        started = time.perf_counter()
        database.local.local_features(wanted, local_describer(name))
        print(f"  {name} features of {len(wanted)} shortlisted photos ready in "
              f"{time.perf_counter() - started:.0f} s", flush=True)  # fmt: skip


def class_benchmark(args: argparse.Namespace, extractor: Extractor) -> list[dict[str, Any]]:
    evalset = protocols.caltech101(args.data, split="heldout", seed=args.seed)
    xb = descriptors(extractor, evalset.images)
    assert evalset.query_ids is not None
    rows = []
    for text in CLASS_CHAINS:
        rows.append(_class_row(text, xb, evalset, evalset.query_ids, len(xb)))
    rng = np.random.default_rng(args.seed)
    sample = np.sort(rng.choice(len(evalset.query_ids), size=args.class_queries, replace=False))
    database = file_database(xb, evalset.images, lookalike_home() / "bench-local")
    for text in ("none", "sv", "sv:features=sift"):
        rows.append(_class_row(text, xb, evalset, evalset.query_ids[sample], 100, database, sample))
    return rows


def _class_row(text: str, xb: np.ndarray, evalset: EvalSet, queries: np.ndarray, depth: int,
               database: Any = None, subset: np.ndarray | None = None) -> dict[str, Any]:  # fmt: skip
    from lookalike.rerank import ArrayDatabase

    chain = parse_chain(text)
    pixels = [load_image(evalset.images[q]) for q in queries] if chain.needs_pixels else []
    started = time.perf_counter()
    ranking = chain.search(database or ArrayDatabase(xb), xb[queries], depth, own=queries, pixels=pixels)
    seconds = time.perf_counter() - started
    gnd = evalset.gnd if subset is None else [evalset.gnd[i] for i in subset]
    ranks = _full_ranks(ranking.ids, len(xb))
    result = compute_map(ranks, gnd, kappas=(1, 10))
    label = text if subset is None else f"{text} ({len(queries)} queries, top 100)"
    row = {"chain": label, "map": result.map, "mp@1": result.mp_at_k[0], "mp@10": result.mp_at_k[1],
           "ms_per_query": 1000 * seconds / len(queries)}  # fmt: skip
    print(f"  classes {label:40s} mAP {row['map']:.4f} mP@1 {row['mp@1']:.3f} {row['ms_per_query']:.1f} ms",
          flush=True)  # fmt: skip
    return row


def _full_ranks(ids: np.ndarray, n: int) -> np.ndarray:
    """Rankings ``(Q, n)`` as :func:`compute_map` takes them: the returned ids first, every other row after
    (in row order), so a truncated shortlist counts what it missed as ranked last."""
    out = np.empty((len(ids), n), np.int64)
    for q, row in enumerate(ids):
        row = row[row >= 0]
        out[q] = np.concatenate([row, np.setdiff1d(np.arange(n), row)])
    return out


def small_benchmark(extractor: Extractor) -> list[dict[str, Any]]:
    rows = []
    for evalset in (protocols.ukbench(DATA / "ukbench-sample"), protocols.holidays(DATA / "holidays-sample")):
        xb = descriptors(extractor, evalset.images)
        assert evalset.query_ids is not None
        database = file_database(xb, evalset.images, lookalike_home() / "bench-local")
        for text in SMALL_CHAINS:
            row = _class_row(text, xb, evalset, evalset.query_ids, len(xb), database)
            rows.append({"set": evalset.name, **row})
    return rows


def cost_benchmark(args: argparse.Namespace) -> list[dict[str, Any]]:
    evalset = protocols.caltech101(args.data, split="all")
    rng = np.random.default_rng(args.seed)
    sample = [evalset.images[i] for i in rng.choice(len(evalset.images), size=100, replace=False)]
    images = [load_image(p) for p in sample]
    rows = []
    for name in ("xfeat", "sift"):
        describer = local_describer(name)
        describer.describe(images[0])
        started = time.perf_counter()
        found = [describer.describe(image) for image in images]
        seconds = (time.perf_counter() - started) / len(images)
        stored = np.mean([len(f.to_bytes()) for f in found])
        keypoints = np.mean([len(f) for f in found])
        rows.append({"features": name, "ms_per_image": 1000 * seconds, "keypoints": float(keypoints),
                     "bytes_per_image": float(stored), "identity": describer.identity})  # fmt: skip
        print(f"  {name}: {1000 * seconds:.1f} ms/image, {keypoints:.0f} keypoints, {stored / 1024:.1f} KiB "
              "stored per image (Caltech-101 photos, ~300×200)", flush=True)  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA / "caltech101")
    parser.add_argument("--only", default="cost,small,copies,classes")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--family-queries", type=int, default=30)
    parser.add_argument("--class-queries", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rerank")
    args = parser.parse_args()
    started = time.perf_counter()
    extractor = Extractor(DescriptorSettings())
    records: dict[str, Any] = {}
    parts = args.only.split(",")
    if "cost" in parts:
        records["cost"] = cost_benchmark(args)
    if "small" in parts:
        records["small"] = small_benchmark(extractor)
    if "copies" in parts:
        records["copies"] = copies_benchmark(args, extractor)
    if "classes" in parts:
        records["classes"] = class_benchmark(args, extractor)
    records["command"] = command_line(started, minutes=True)
    text = render(records)
    print(text)
    write_report(args.out, text, records)


def render(records: dict[str, Any]) -> str:
    lines = [f"# Re-ranking\n\n{records['command']}\n"]
    if "copies" in records:
        lines.append("| set | chain | recall@1 | recall@10 | mAP | ms/query | recall@1 per edit |")
        lines.append("|---|---|---|---|---|---|---|")
        for r in records["copies"]:
            edits = ", ".join(f"{k} {v:.2f}" for k, v in r["per_edit"].items())
            lines.append(f"| {r['set']} | `{r['chain']}` | {r['recall_at_1']:.3f} | {r['recall_at_10']:.3f} | "
                         f"{r['map']:.3f} | {r['ms_per_query']:.0f} | {edits} |")  # fmt: skip
    for key in ("classes", "small"):
        if key in records:
            lines.append(f"\n| {key} | chain | mAP | mP@1 | ms/query |\n|---|---|---|---|---|")
            for r in records[key]:
                lines.append(f"| {r.get('set', 'caltech101-heldout')} | `{r['chain']}` | {r['map']:.4f} | "
                             f"{r['mp@1']:.3f} | {r['ms_per_query']:.1f} |")  # fmt: skip
    if "cost" in records:
        lines.append("\n| local features | ms/image | keypoints | KiB stored/image |\n|---|---|---|---|")
        for r in records["cost"]:
            lines.append(f"| {r['features']} | {r['ms_per_image']:.1f} | {r['keypoints']:.0f} | "
                         f"{r['bytes_per_image'] / 1024:.1f} |")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
