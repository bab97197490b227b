"""Load on the web server: 1,000 searches at concurrency 16 against `lookalike serve` on 127.0.0.1.

Steps: build (or take) a collection → start `lookalike serve` on a free loopback port → warm up → the
single-client figure: uploads of a 512-px photo, one at a time, "upload → 30 results" p50 (target ≤ 0.3 s on
2 cores) → the load: ``--requests`` searches from ``--concurrency`` clients, alternating an upload of the
512-px photo and a search by an indexed image's id, bounded by ``--max-seconds`` → errors (must be 0),
p50 / p99 latency, throughput → stop the server (Ctrl+C, graceful) → JSON report.

Traffic goes only to 127.0.0.1, and the run stops by itself. Other work on a shared machine inflates the
latencies: the figures are indicative there.

Run: ``.venv/bin/python benchmarks/load.py [--collection PATH] [--requests 1000] [--concurrency 16]``.
Without ``--collection`` a temporary collection is built with the default descriptor settings: the UKBench
sample (else the bundled sample) in its root, plus whole Caltech-101 classes (linked, read in place) up to
``--caltech`` images, one folder per class — so a search has 30 results to return, and /api/recognize
has labelled references (the single-client "upload → label" figure).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import torch

from lookalike.collection import Collection
from lookalike.cpu import cpu_info
from lookalike.extract import DescriptorSettings
from lookalike.images import load_image, resize_long_side

ROOT = Path(__file__).resolve().parents[1]
UKBENCH = ROOT.parent / "shared" / "data" / "ukbench-sample"
CALTECH = ROOT.parent / "shared" / "data" / "caltech101"
SAMPLE = ROOT / "src" / "lookalike" / "sample"
QUERY_SIDE = 512
TARGET_P50 = 0.3


@dataclass(frozen=True)
class Sample:
    kind: str  # "upload" or "id"
    status: int  # 0: no answer (timeout, connection error)
    seconds: float
    results: int


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--collection", type=Path, help="A collection to serve (default: a temporary one).")
    parser.add_argument("--photos", type=Path, help="Folder to index for the temporary collection.")
    parser.add_argument("--caltech", type=int, default=400, help="Caltech-101 images to add to it.")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--single", type=int, default=30, help="Uploads timed one at a time.")
    parser.add_argument("--max-seconds", type=float, default=900.0, help="Stop issuing requests after this.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "load.json")
    args = parser.parse_args()

    cpu = cpu_info()
    print(f"CPU: {cpu.describe()}; torch threads {torch.get_num_threads()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="lookalike-load-") as scratch:
        collection = args.collection or build_collection(args.photos, args.caltech, Path(scratch))
        with Collection.open(collection, readonly=True) as opened:
            info = opened.info()
        photo = query_photo(info.root)
        print(
            f"collection {collection}: {info.images} images, {info.settings['model']}, imsize "
            f"{info.settings['imsize']}; query {QUERY_SIDE}-px JPEG of {len(photo)} bytes",
            flush=True,
        )
        with server(collection, Path(scratch) / "serve.log") as base:
            single, load, wall, ids = asyncio.run(run(base, photo, args))
    report = summarise(args, cpu.describe(), info, single, load, wall, ids)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"report → {args.out}")
    if report["load"]["errors"]:
        sys.exit(1)


def build_collection(photos: Path | None, caltech: int, scratch: Path) -> Path:
    folder = photos or gather_photos(scratch / "photos", caltech)
    path = scratch / "collection"
    started = time.perf_counter()
    with Collection.create(path, DescriptorSettings(), root=folder) as collection:
        report = collection.sync()
    print(f"indexed {report.indexed} photos of {folder} in {time.perf_counter() - started:.1f} s", flush=True)
    return path


def gather_photos(folder: Path, caltech: int) -> Path:
    """The UKBench sample (else the bundled sample) copied into ``folder``, and links to whole Caltech-101
    object classes until at least ``caltech`` images."""
    folder.mkdir()
    for photo in sorted((UKBENCH if UKBENCH.is_dir() else SAMPLE).glob("*.jpg")):
        (folder / photo.name).write_bytes(photo.read_bytes())
    count = 0
    classes = (
        sorted(p for p in CALTECH.iterdir() if p.is_dir() and p.name.islower()) if CALTECH.is_dir() else []
    )
    for source in classes:
        if count >= caltech:
            break
        (folder / source.name).symlink_to(source.resolve(), target_is_directory=True)
        count += sum(1 for _ in source.glob("*.jpg"))
    return folder


def query_photo(root: str | None) -> bytes:
    """A photo of the collection (else the sample cat) with its long side 512 px, as a JPEG."""
    candidates = sorted(Path(root).glob("*.jpg")) if root else []
    image = resize_long_side(load_image(candidates[0] if candidates else SAMPLE / "cat.jpg"), QUERY_SIDE)
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


class server:
    """`lookalike serve` on a free port of 127.0.0.1, stopped with Ctrl+C (SIGINT) at the end."""

    def __init__(self, collection: Path, log: Path) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.collection, self.log = collection, log

    def __enter__(self) -> str:
        command = [
            sys.executable,
            "-m",
            "lookalike",
            "serve",
            "-c",
            str(self.collection),
            "--port",
            str(self.port),
        ]
        self.process = subprocess.Popen(command, stdout=self.log.open("w"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                httpx.get(f"{base}/api/health", timeout=2).raise_for_status()
                return base
            except httpx.HTTPError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.__exit__()
                    raise SystemExit(f"the server did not start:\n{self.log.read_text()}") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


async def run(
    base: str, photo: bytes, args: argparse.Namespace
) -> tuple[list[Sample], list[Sample], float, int]:
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(base_url=base, limits=limits, timeout=120) as client:
        warm = await client.post(
            "/api/search", files={"image": ("q.jpg", photo, "image/jpeg")}, data={"k": "100"}
        )
        warm.raise_for_status()
        ids = [hit["id"] for hit in warm.json()["results"]]
        for _ in range(3):
            await search(client, "upload", photo, ids, 0)
        labelled: list[Sample] = []
        single = [await search(client, "upload", photo, ids, 0) for _ in range(args.single)]
        print(f"single client: upload → 30 results at {QUERY_SIDE} px, p50 {p50(single):.3f} s", flush=True)
        if (await client.get("/api/info")).json()["recognition"] is not None:
            labelled = [await search(client, "recognize", photo, ids, 0) for _ in range(args.single)]
            print(f"single client: upload → label, p50 {p50(labelled):.3f} s", flush=True)

        queue: asyncio.Queue[int] = asyncio.Queue()
        for number in range(args.requests):
            queue.put_nowait(number)
        samples: list[Sample] = []
        deadline = time.monotonic() + args.max_seconds

        async def worker() -> None:
            while time.monotonic() < deadline:
                try:
                    number = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                kind = "upload" if number % 2 == 0 else "id"
                samples.append(await search(client, kind, photo, ids, number))
                if len(samples) % 100 == 0:
                    print(f"  {len(samples)} / {args.requests}", flush=True)

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        return single + labelled, samples, time.perf_counter() - started, len(ids)


async def search(client: httpx.AsyncClient, kind: str, photo: bytes, ids: list[int], number: int) -> Sample:
    started = time.perf_counter()
    try:
        if kind == "upload":
            response = await client.post("/api/search", files={"image": ("q.jpg", photo, "image/jpeg")})
        elif kind == "recognize":
            response = await client.post("/api/recognize", files={"image": ("q.jpg", photo, "image/jpeg")})
        else:
            response = await client.post("/api/search", json={"id": ids[number % len(ids)]})
        status = response.status_code
        body = response.json() if status == 200 else {}
        results = len(body.get("results", body.get("neighbours", [])))
    except httpx.HTTPError:
        status, results = 0, 0
    return Sample(kind, status, time.perf_counter() - started, results)


def p50(samples: list[Sample]) -> float:
    return statistics.median(s.seconds for s in samples) if samples else float("nan")


def percentile(samples: list[Sample], q: float) -> float:
    values = sorted(s.seconds for s in samples)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))] if values else float("nan")


def latency(samples: list[Sample]) -> dict[str, Any]:
    return {
        "count": len(samples),
        "p50_s": round(p50(samples), 4),
        "p90_s": round(percentile(samples, 0.90), 4),
        "p99_s": round(percentile(samples, 0.99), 4),
        "max_s": round(max((s.seconds for s in samples), default=float("nan")), 4),
    }


def summarise(args, cpu: str, info, timed, load, wall, ids) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    expected = min(30, info.images)  # every search must return this many results
    errors = [s for s in load if s.status != 200 or s.results != expected]
    single = [s for s in timed if s.kind == "upload"]
    labelled = [s for s in timed if s.kind == "recognize"]
    single_p50 = p50(single)
    report = {
        "benchmark": "load",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "cpu": cpu,
        "torch_threads": torch.get_num_threads(),
        "collection": {
            "images": info.images,
            "model": info.settings["model"],
            "imsize": info.settings["imsize"],
            "pooling": info.settings["pooling"],
        },
        "query": f"{QUERY_SIDE}-px JPEG upload, or an id among {ids}",
        "single_client_upload_30_results": {
            **latency(single),
            "results": sorted({s.results for s in single}),
            "target_p50_s": TARGET_P50,
            "meets_target": single_p50 <= TARGET_P50 and all(s.results == expected for s in single),
        },
        "single_client_upload_label": {
            **latency(labelled),
            "neighbours": sorted({s.results for s in labelled}),
        }
        if labelled
        else None,
        "load": {
            "requests": len(load),
            "asked": args.requests,
            "concurrency": args.concurrency,
            "errors": len(errors),
            "statuses": dict(Counter(str(s.status) for s in load)),
            "seconds": round(wall, 2),
            "requests_per_second": round(len(load) / wall, 2) if wall else None,
            "all": latency(load),
            "upload": latency([s for s in load if s.kind == "upload"]),
            "id": latency([s for s in load if s.kind == "id"]),
        },
    }
    lines = [
        f"single client, upload → 30 results at {QUERY_SIDE} px: p50 {single_p50:.3f} s "
        f"(target ≤ {TARGET_P50} s: {'met' if single_p50 <= TARGET_P50 else 'NOT met'}), "
        f"{sorted({s.results for s in single})} results",
        f"load: {len(load)} requests at concurrency {args.concurrency} in {wall:.1f} s "
        f"({report['load']['requests_per_second']} req/s), errors {len(errors)}",
    ]
    if labelled:
        lines.insert(1, f"single client, upload → label: p50 {p50(labelled):.3f} s")
    for name in ("all", "upload", "id"):
        figures = report["load"][name]
        lines.append(
            f"  {name:6} p50 {figures['p50_s']:.3f} s  p99 {figures['p99_s']:.3f} s  (n={figures['count']})"
        )
    print("\n".join(lines))
    return report


if __name__ == "__main__":
    main()
