"""Fault injection over a real collection: every collection file truncated or garbled at several offsets,
plus the scenario faults of issue 11, each on a fresh copy. For each fault: was it detected (a typed error or
a `check` finding), repaired (`check --repair`, then results equal to the undamaged collection), lost
(images whose results cannot be had back without re-indexing), or silent (results changed and nothing
said so — the one outcome that must never happen).

    .venv/bin/python benchmarks/faults.py [--data FOLDER] [--imsize 128]

The default folder is the bundled sample plus the UKBench sample (so rows, pages and index are not tiny).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from lookalike.collection import Collection
from lookalike.collection.check import check_collection
from lookalike.collection.fitting import fit_collection_pca
from lookalike.cpu import cpu_info
from lookalike.errors import LookalikeError
from lookalike.extract import DescriptorSettings

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "src" / "lookalike" / "sample"
UKBENCH = ROOT.parent / "shared" / "data" / "ukbench-sample"
FILES = ("collection.sqlite", "vectors.f32", "index.faiss", "index.json", "whitening.npz")
DAMAGES = ("truncate-0", "truncate-half", "truncate-row", "garble-start", "garble-middle", "garble-end")
Results = dict[str, list[tuple[str, float]]]


@dataclass
class Outcome:
    fault: str
    detected: bool
    repaired: bool
    lost: int
    silent: bool
    note: str = ""


def results_of(path: Path) -> Results:
    with Collection.open(path, readonly=True) as collection:
        return {
            name: [(h.path, round(h.score, 3)) for h in collection.search(record.id, k=3)]
            for name, record in collection.images().items()
        }


def same(a: Results, b: Results) -> bool:
    return sorted(a) == sorted(b) and all(
        [p for p, _ in a[n]] == [p for p, _ in b[n]]
        and np.allclose([s for _, s in a[n]], [s for _, s in b[n]], atol=3e-3)
        for n in a
    )


def damage(path: Path, how: str, row_bytes: int) -> None:
    size = path.stat().st_size
    if how.startswith("truncate"):
        keep = {"truncate-0": 0, "truncate-half": size // 2, "truncate-row": max(size - row_bytes // 2, 0)}[
            how
        ]
        os.truncate(path, keep)
        return
    at = {"garble-start": 0, "garble-middle": size // 2, "garble-end": max(size - 64, 0)}[how]
    with open(path, "r+b") as handle:
        handle.seek(at)
        handle.write(bytes((i * 37 + 11) % 256 for i in range(64)))


def judge(
    fault: str, path: Path, expected: Results, unwhitened: Results, inject: Callable[[], None]
) -> Outcome:
    inject()
    detected, silent = False, False
    try:
        silent = not same(results_of(path), expected)
    except LookalikeError:
        detected = True
    report = check_collection(path)
    detected = detected or report.damaged or any(f.damage for f in report.findings)
    repaired_report = check_collection(path, repair=True)
    if repaired_report.damaged:
        with_data = len(expected)
        return Outcome(fault, detected, False, with_data, silent and not detected, "re-index needed")
    try:
        now = results_of(path)
    except LookalikeError as exc:
        return Outcome(fault, detected, False, len(expected), False, f"still refused: {exc}")
    whitening_removed = any(f.part == "whitening" and f.repair for f in repaired_report.findings)
    target = unwhitened if whitening_removed else expected
    lost = len(set(target) - set(now))
    note = "whitening removed: fit again" if whitening_removed else ""
    return Outcome(fault, detected, same(now, target) or lost > 0, lost, silent and not detected, note)


def build(folder: Path, work: Path, imsize: int) -> tuple[Path, Path]:
    photos = work / "photos"
    photos.mkdir()
    for source in sorted(folder.glob("*.jpg")) + sorted(UKBENCH.glob("*.jpg"))[:40]:
        shutil.copy2(source, photos / source.name)
    plain, whitened = work / "plain", work / "whitened"
    with Collection.create(plain, DescriptorSettings(imsize=imsize), root=photos) as collection:
        collection.sync()
    shutil.copytree(plain, whitened)
    with Collection.open(whitened) as collection:
        collection.set_whitening(fit_collection_pca(collection))
        collection.index()
    return plain, whitened


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=SAMPLE)
    parser.add_argument("--imsize", type=int, default=128)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "faults.json")
    args = parser.parse_args()
    outcomes = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        plain, whitened = build(args.data, work, args.imsize)
        expected, unwhitened = results_of(whitened), results_of(plain)
        with Collection.open(whitened, readonly=True) as collection:
            row_bytes = collection.vectors.row_bytes
        for name in FILES:
            for how in DAMAGES:
                copy = work / f"{name}-{how}"
                shutil.copytree(whitened, copy)
                inject = lambda c=copy, n=name, h=how: damage(c / n, h, row_bytes)  # noqa: E731
                outcomes.append(judge(f"{name} {how}", copy, expected, unwhitened, inject))
                shutil.rmtree(copy)
    show(outcomes, args)


def show(outcomes: list[Outcome], args: argparse.Namespace) -> None:
    info = cpu_info()
    print(f"{info.model} ({info.cores} cores) · {datetime.now(UTC).isoformat(timespec='seconds')}")
    print("| fault | detected | repaired | images lost | silent | note |\n|---|---|---|---|---|---|")
    for o in outcomes:
        print(f"| {o.fault} | {'yes' if o.detected else 'no'} | {'yes' if o.repaired else 'no'} | {o.lost} | "
              f"{'**SILENT**' if o.silent else 'no'} | {o.note} |")  # fmt: skip
    total = len(outcomes)
    detected = sum(o.detected for o in outcomes)
    repaired = sum(o.repaired for o in outcomes)
    silent = sum(o.silent for o in outcomes)
    harmless = sum(not o.detected and not o.silent for o in outcomes)
    print(f"\n{total} faults injected: {detected} detected, {harmless} harmless (results unchanged), "
          f"{repaired} repaired, {sum(o.lost > 0 for o in outcomes)} with images lost, {silent} silent")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpu": info.model, "outcomes": [asdict(o) for o in outcomes]}, indent=1))
    sys.exit(1 if silent else 0)


if __name__ == "__main__":
    main()
