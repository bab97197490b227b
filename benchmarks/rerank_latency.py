"""Spatial verification's latency per query at shortlist 20/50/100 with the database's local features
already stored (a collection indexed with ``--local-features``): a first pass fills the feature cache, the
second is timed. Same data as ``benchmarks/rerank.py`` (its strong edited copies among all Caltech-101
photos, default descriptor).

    .venv/bin/python benchmarks/rerank_latency.py [--queries 50] [--chains sv,sv:keypoints=512,...]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from lookalike.evaluate import protocols
from lookalike.evaluate.copies import EDITS, edited_copies, file_database, run_copies
from lookalike.evaluate.protocols import CALTECH_DISTRACTOR, CALTECH_TWINS
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.home import lookalike_home
from lookalike.rerank import parse_chain
from report import command_line, write_report
from rerank import DATA, ROOT, descriptors

CHAINS = "sv:top=20,sv:top=50,sv,sv:keypoints=512,sv:features=sift,sv:features=sift,top=50"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=50)
    parser.add_argument("--chains", default=CHAINS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "rerank-latency")
    args = parser.parse_args()
    started = time.perf_counter()
    evalset = protocols.caltech101(DATA / "caltech101", split="all")
    paths = evalset.images
    objects = np.flatnonzero([p.parent.name != CALTECH_DISTRACTOR for p in paths])
    counts = {"strong": 200, **{f: 30 for f in EDITS if f != "strong"}}
    copies = edited_copies(paths, counts, args.seed, lookalike_home() / "bench-copies" / f"seed{args.seed}",
                           eligible=objects, twins=CALTECH_TWINS)  # fmt: skip
    chosen = np.arange(args.queries)
    part = copies.subset(chosen)
    extractor = Extractor(DescriptorSettings())
    xb, xq = descriptors(extractor, paths), descriptors(extractor, copies.paths)[chosen]
    database = file_database(xb, paths, lookalike_home() / "bench-local")
    rows = []
    for text in _chains(args.chains):
        chain = parse_chain(text)
        run_copies(chain, database, xq, part)  # fills the cache: features of every candidate stored
        result = run_copies(chain, database, xq, part)
        rows.append({"chain": text, "ms_per_query": result.ms_per_query, "recall_at_1": result.recall_at_1})
        print(f"  {text:32s} {result.ms_per_query:7.1f} ms/query  R@1 {result.recall_at_1:.3f}", flush=True)
    text = f"# sv latency, features stored\n\n{command_line(started, minutes=True)}\n\n"
    text += "| chain | ms/query | recall@1 |\n|---|---|---|\n"
    text += "".join(f"| `{r['chain']}` | {r['ms_per_query']:.0f} | {r['recall_at_1']:.3f} |\n" for r in rows)
    print(text)
    write_report(args.out, text, rows)


def _chains(text: str) -> list[str]:
    """Chains separated by commas where the next word starts a stage (``sv,sv:top=50`` is two chains)."""
    out: list[str] = []
    for word in text.split(","):
        if word.startswith("sv") or not out:
            out.append(word)
        else:
            out[-1] += "," + word
    return out


if __name__ == "__main__":
    main()
