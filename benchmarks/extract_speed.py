"""Descriptor extraction speed on this CPU: images/s per variant, against the naive loop and the machine's limit.

Steps: environment → GEMM rate per precision → network FLOPs per input size → images/s per variant →
fraction of the limit and speed-up over the naive loop → bf16/fp32 descriptor agreement → targets.

* limit(precision) = FLOPs ÷ GEMM rate of that precision: the time the convolutions would take at the speed
  of one large square matrix product. The rate is the better of ``torch.mm`` (MKL BLAS for fp32) and the same
  product as a 1×1 convolution (oneDNN, which runs the network's convolutions), measured before and after.
* FLOPs come from ``torch.utils.flop_counter`` (2 per multiply-add; convolutions and matrix products only).
* Inputs are a real photo (holidays 100000.jpg turned landscape) resized to a 4:3 shape whose long side is
  the size: 224 → 224×168, 512 → 512×384, 1024 → 1024×768 (W×H). A batch repeats that input.
* Each variant is built and warmed up on the input shape, then all variants are timed round-robin, one call
  each per round, so a slow spell on a shared machine hits every variant alike. Medians are reported.

Run: ``.venv/bin/python benchmarks/extract_speed.py [--sizes 224,512,1024] [--repeats N] [--quick]``.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from functools import cache, partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from lookalike.cpu import cpu_info, keep_heap
from lookalike.images import load_image, resize_long_side, resize_max_side
from lookalike.network import DescriptorNet, InferenceNet, build_descriptor_net
from lookalike.precision import resolve_precision
from lookalike.registry import DEFAULT_MODEL, Preprocess, get_model_config
from lookalike.transforms import to_tensor

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
PHOTO = "holidays-sample/100000.jpg"
AGREEMENT_GLOBS = ("holidays-sample/*.jpg", "ukbench-sample/*.jpg")
BATCH = 4
TARGET_SIZE, TARGET_FRACTION, TARGET_SPEEDUP = 1024, 0.70, 2.0
HEADER = ["input", "GFLOP", "variant", "batch", "ms/image", "images/s", "% limit", "× naive", "cos", "note"]

Call = Callable[[], object]
Prepare = Callable[[torch.Tensor], Call]  # input batch → a call that runs the variant on it


@dataclass(frozen=True)
class Variant:
    name: str
    precision: str  # the GEMM rate that bounds it
    batch: int
    prepare: Prepare


@dataclass
class Row:
    size: int
    shape: str
    variant: str
    precision: str
    batch: int
    samples: list[float] = field(default_factory=list)
    setup_s: float | None = None
    first_call_s: float | None = None
    median_s: float | None = None
    best_s: float | None = None
    ms_per_image: float | None = None
    images_per_s: float | None = None
    limit_fraction: float | None = None
    speedup: float | None = None
    cosine_vs_naive: float | None = None
    note: str = ""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="224,512,1024", help="long sides, comma-separated")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per variant (median reported)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "extract_speed.json")
    parser.add_argument("--data", type=Path, default=DATA, help="folder with holidays-/ukbench-sample")
    parser.add_argument("--quick", action="store_true", help="2048 GEMM, no optional alternatives")
    parser.add_argument(
        "--release-heap",
        action="store_true",
        help="glibc default: return large freed blocks to the OS (lookalike keeps them, LOOKALIKE_KEEP_HEAP=0)",
    )
    return parser.parse_args(argv)


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


# --- GEMM rate ----------------------------------------------------------------------------------------------


def gflops(call: Call, n: int, repeats: int) -> float:
    call()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def gemm_calls(dtype: torch.dtype, n: int) -> dict[str, Call]:
    """``torch.mm`` and the same n×n×n product as a channels-last 1×1 convolution over n pixels (oneDNN)."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    x = torch.randn(1, n, n // 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1).to(dtype).contiguous(memory_format=torch.channels_last)
    return {"matmul": lambda: torch.mm(a, b), "onednn_conv1x1": lambda: F.conv2d(x, w)}


def gemm_rates(n: int, repeats: int) -> dict[str, dict]:
    """GFLOP/s (GOP/s for int8) per precision the CPU offers; ``gflops`` is the rate the limit uses."""
    rates: dict[str, dict] = {}
    for precision in cpu_info().precisions:
        if precision == "int8":
            rates["int8"] = int8_rate(n, repeats)
            continue
        calls = gemm_calls(torch.bfloat16 if precision == "bf16" else torch.float32, n)
        rates[precision] = {name: gflops(call, n, repeats) for name, call in calls.items()}
        rates[precision]["gflops"] = max(rates[precision].values())
    return rates


def int8_rate(n: int, repeats: int) -> dict:
    a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    try:
        return {"gflops": gflops(lambda: torch._int_mm(a, a), n, repeats), "via": "torch._int_mm"}
    except (RuntimeError, NotImplementedError) as exc:
        return {"gflops": None, "note": f"torch._int_mm unsupported on this CPU build: {exc}"[:200]}


def best_rates(start: dict[str, dict], end: dict[str, dict]) -> dict[str, dict]:
    """Rates measured before and after the network runs; the limit uses the faster (the stricter limit)."""
    best = {}
    for precision, first in start.items():
        values = [v for v in (first["gflops"], end[precision]["gflops"]) if v is not None]
        best[precision] = {"start": first, "end": end[precision], "gflops": max(values, default=None)}
    return best


def busy_warning(rates: dict[str, dict], load: float) -> str:
    """Non-empty when the machine was not quiet: load before the run, or GEMM rates that moved > 10 %."""
    pairs = {p: (r["start"]["gflops"], r["end"]["gflops"]) for p, r in rates.items()}
    moved = ", ".join(p for p, (a, b) in pairs.items() if a and b and abs(a / b - 1) > 0.10)
    why = [f"load average {load:.1f} before the run"] if load > 0.5 else []
    why += [f"GEMM rate of {moved} moved > 10 % during the run"] if moved else []
    return f"machine not quiet ({'; '.join(why)}): figures unreliable" if why else ""


def rates_text(rates: dict[str, dict]) -> str:
    return ", ".join(f"{p} {fmt(r['gflops'], '.0f')}" for p, r in rates.items()) + " GFLOP/s (int8: GOP/s)"


# --- inputs and FLOPs ---------------------------------------------------------------------------------------


@cache
def landscape_photo(path: Path) -> Image.Image:
    image = load_image(path)
    return image.transpose(Image.Transpose.ROTATE_90) if image.height > image.width else image


def photo_input(path: Path, size: int, preprocess: Preprocess) -> torch.Tensor:
    return to_tensor(resize_long_side(landscape_photo(path), size), preprocess)[None]


def count_flops(net: nn.Module, x: torch.Tensor) -> int:
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(x)
    return int(counter.get_total_flops())


# --- variants -----------------------------------------------------------------------------------------------


def under(
    model: Callable[[torch.Tensor], object], *contexts: Callable[[], AbstractContextManager]
) -> Prepare:
    """Run ``model`` on the batch inside fresh ``contexts`` (no_grad, autocast, …)."""

    def prepare(x: torch.Tensor) -> Call:
        def run() -> object:
            with ExitStack() as stack:
                for context in contexts:
                    stack.enter_context(context())
                return model(x)

        return run

    return prepare


def jit_frozen(fast: InferenceNet) -> Prepare:
    """TorchScript trace → freeze → optimize_for_inference (folds, fuses conv+ReLU/add into oneDNN ops)."""
    module = DescriptorNet(fast.features, fast.pool, fast.whiten).eval()  # type: ignore[arg-type]

    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(fast.dtype).contiguous(memory_format=torch.channels_last)

    def prepare(x: torch.Tensor) -> Call:
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            script = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(module, cast(x))))
        return under(lambda t: script(cast(t)), torch.no_grad)(x)

    return prepare


def compiled(fast: InferenceNet) -> Prepare:
    def prepare(x: torch.Tensor) -> Call:
        torch._dynamo.reset()
        module = torch.compile(fast, dynamic=False)
        module(x)  # compile for this shape here, so setup_s holds the compile time
        return lambda: module(x)

    return prepare


def onnxruntime_fp32(net: DescriptorNet) -> Prepare:
    """The unfused fp32 network exported by torch.onnx at a fixed shape; ORT folds and fuses on its own."""

    def prepare(x: torch.Tensor) -> Call:
        import onnxruntime as ort  # optional: install onnxruntime and onnx to measure it

        with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), f"{folder}/net.onnx", dynamo=False, input_names=["x"])
            options = ort.SessionOptions()
            options.intra_op_num_threads = torch.get_num_threads()
            session = ort.InferenceSession(f"{folder}/net.onnx", options, providers=["CPUExecutionProvider"])
        pixels = x.numpy()
        return lambda: session.run(None, {"x": pixels})[0]

    return prepare


def variants(net: DescriptorNet, default: str, quick: bool) -> list[Variant]:
    has_bf16 = cpu_info().has_bf16
    fast = {p: InferenceNet(net, p) for p in ("fp32", "bf16") if p == "fp32" or has_bf16}  # type: ignore[arg-type]
    chosen = [Variant("naive fp32 (cirtorch loop)", "fp32", 1, under(net, torch.no_grad))]
    for p, model in fast.items():
        chosen += [Variant(f"lookalike {p}", p, batch, under(model)) for batch in (1, BATCH)]
    if quick:
        return chosen
    if has_bf16:
        autocast = under(net, torch.inference_mode, partial(torch.autocast, "cpu", dtype=torch.bfloat16))
        chosen.append(Variant("autocast bf16, unfused", "bf16", 1, autocast))
    chosen += [Variant(f"jit freeze+optimize {p}", p, 1, jit_frozen(model)) for p, model in fast.items()]
    chosen.append(Variant(f"torch.compile {default}", default, 1, compiled(fast[default])))
    chosen.append(Variant("onnxruntime fp32", "fp32", 1, onnxruntime_fp32(net)))
    return chosen


# --- timing -------------------------------------------------------------------------------------------------


def as_array(output: object) -> np.ndarray:
    return np.asarray(output.float() if isinstance(output, torch.Tensor) else output, dtype=np.float32)


def prepare(variant: Variant, x: torch.Tensor, reference: np.ndarray, row: Row) -> Call | None:
    """Build ``variant`` for a batch of ``x`` and warm it up; a failure becomes the row's note."""
    try:
        start = time.perf_counter()
        call = variant.prepare(x.repeat(variant.batch, 1, 1, 1))
        row.setup_s = time.perf_counter() - start
        start = time.perf_counter()
        output = call()
        row.first_call_s = time.perf_counter() - start
        row.cosine_vs_naive = float(np.min(as_array(output) @ reference))
        return call
    except Exception as exc:  # an optional backend that will not build or run is a finding, not a crash
        row.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
        return None


def time_interleaved(calls: list[Call | None], rows: list[Row], repeats: int) -> None:
    for _ in range(repeats):
        for call, row in zip(calls, rows, strict=True):
            if call is not None:
                start = time.perf_counter()
                call()
                row.samples.append(time.perf_counter() - start)


def run_size(net: DescriptorNet, chosen: list[Variant], x: torch.Tensor, repeats: int) -> tuple[int, list]:
    """(FLOPs per image, one timed row per variant) at the input shape of ``x``."""
    flops = count_flops(net, x)
    with torch.no_grad():
        reference = net(x)[0].numpy()
    shape = f"{x.shape[3]}×{x.shape[2]}"
    rows = [Row(max(x.shape[2:]), shape, v.name, v.precision, v.batch) for v in chosen]
    calls = [prepare(variant, x, reference, row) for variant, row in zip(chosen, rows, strict=True)]
    time_interleaved(calls, rows, repeats)
    for row in rows:
        median = statistics.median(row.samples) if row.samples else None
        print(f"  {shape:>9}  {row.variant:<28} ×{row.batch}  {fmt(median, '.3f')} s  {row.note}")
    return flops, rows


def derive(rows: list[Row], flops: dict[int, int], rates: dict[str, dict]) -> None:
    """Per-image figures, fraction of the limit, and speed-up over the naive row of the same size."""
    naive = {
        r.size: statistics.median(r.samples) for r in rows if r.variant.startswith("naive") and r.samples
    }
    for row in (r for r in rows if r.samples):
        row.median_s, row.best_s = statistics.median(row.samples), min(row.samples)
        per_image = row.median_s / row.batch
        row.ms_per_image, row.images_per_s = per_image * 1e3, 1 / per_image
        rate = rates.get(row.precision, {}).get("gflops")
        row.limit_fraction = flops[row.size] / (rate * 1e9) / per_image if rate else None
        row.speedup = naive[row.size] / per_image if row.size in naive else None


# --- agreement, targets, reports ----------------------------------------------------------------------------


def agreement(net: DescriptorNet, preprocess: Preprocess, side: int, data: Path) -> dict[str, float]:
    """Lowest cosine between the naive fp32 descriptors and lookalike's, per precision, on real photos."""
    paths = sorted(p for pattern in AGREEMENT_GLOBS for p in data.glob(pattern))
    models = {p: InferenceNet(net, p) for p in cpu_info().precisions if p in ("fp32", "bf16")}  # type: ignore[arg-type]
    lowest = dict.fromkeys(models, 1.0)
    for path in paths:
        x = to_tensor(resize_max_side(load_image(path), side), preprocess)[None]
        with torch.no_grad():
            reference = net(x)[0].numpy()
        for p, model in models.items():
            lowest[p] = min(lowest[p], float(model(x)[0].numpy() @ reference))
    return {"images": len(paths), "side": side, **{f"min_cosine_{p}": c for p, c in lowest.items()}}


def target(variant: str, goal: str, value: float | None, passed: bool | None) -> dict:
    result = "n/a (no precision faster than fp32)" if passed is None else ("PASS" if passed else "MISS")
    return {"variant": variant, "target": goal, "value": value, "result": result}


def targets(rows: list[Row], default: str, rates: dict[str, dict]) -> list[dict]:
    """The issue's targets at 1024 px for lookalike at its default precision, one image and batched."""
    faster = (rates.get("bf16", {}).get("gflops") or 0.0) > rates["fp32"]["gflops"]
    found = []
    for row in rows:
        if row.size == TARGET_SIZE and row.variant == f"lookalike {default}":
            name, fraction, speedup = f"{row.variant} ×{row.batch}", row.limit_fraction, row.speedup
            goal = f"≥ {TARGET_FRACTION:.0%} of limit"
            found.append(target(name, goal, fraction, (fraction or 0) >= TARGET_FRACTION))
            passed = (speedup or 0) >= TARGET_SPEEDUP if faster else None
            found.append(target(name, f"≥ {TARGET_SPEEDUP:g}× naive", speedup, passed))
    return found


def cells(row: Row, flops: dict[int, int]) -> list[str]:
    timing = f"setup {row.setup_s:.1f} s, first call {row.first_call_s:.2f} s" if row.first_call_s else ""
    percent = row.limit_fraction * 100 if row.limit_fraction is not None else None
    numbers = [fmt(row.ms_per_image, ".1f"), fmt(row.images_per_s, ".2f"), fmt(percent, ".0f")]
    numbers += [fmt(row.speedup, ".2f"), fmt(row.cosine_vs_naive, ".5f")]
    first = [row.shape, f"{flops[row.size] / 1e9:.1f}", row.variant, str(row.batch)]
    return [*first, *numbers, row.note or timing]


def print_table(rows: list[Row], flops: dict[int, int]) -> None:
    lines = [HEADER] + [cells(row, flops) for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(HEADER))]
    left = {HEADER.index("variant"), HEADER.index("note")}
    for line in lines:
        print("  ".join(c.ljust(widths[i]) if i in left else c.rjust(widths[i]) for i, c in enumerate(line)))


def markdown(report: dict, rows: list[Row], flops: dict[int, int]) -> str:
    env, agree = report["environment"], report["agreement"]
    cosines = ", ".join(
        f"{k.removeprefix('min_cosine_')} {v:.5f}" for k, v in agree.items() if k.startswith("min")
    )
    lines = [
        f"#### `{env['command']}`",
        "",
        f"{env['cpu']} · torch {env['torch']} · {env['threads']} threads · {env['date']}  ",
        f"GEMM rate: {rates_text(report['gemm'])}. Default precision: {env['default_precision']}. "
        + f"Heap kept (lookalike's default, for every variant incl. naive): {'yes' if env['keep_heap'] else 'no'}.  ",
        f"Lowest cosine to the naive fp32 descriptor, {agree['images']} photos at ≤ {agree['side']} px: {cosines}.",
        "",
        "| " + " | ".join(HEADER[:-1]) + " |",
        "|" + "---|" * (len(HEADER) - 1),
    ]
    lines += ["| " + " | ".join(cells(row, flops)[:-1]) + " |" for row in rows if row.samples]
    lines += [f"\n**{report['warning']}**"] if report["warning"] else []
    lines += [""] + [
        f"- {t['variant']}: {t['target']} → **{t['result']}** ({fmt(t['value'], '.2f')})"
        for t in report["targets"]
    ]
    return "\n".join(lines)


def environment(args: argparse.Namespace, default: str, load: float) -> dict[str, Any]:
    info = cpu_info()
    return {
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "cpu": info.describe(),
        "isa": info.isa,
        "precisions": info.precisions,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "load_average_at_start": load,
        "model": args.model,
        "default_precision": default,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # before this run adds its own
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    torch.manual_seed(0)
    config = get_model_config(args.model)
    net = build_descriptor_net(config, "gem")
    env = environment(args, resolve_precision(net, config, "auto"), load)
    if args.release_heap:
        os.environ["LOOKALIKE_KEEP_HEAP"] = "0"
    env["keep_heap"] = keep_heap()
    print(f"{env['cpu']}\ntorch {env['torch']}, {env['threads']} threads, {env['date']}")
    gemm_n, gemm_repeats = (2048 if args.quick else 4096), max(3, args.repeats)
    start_rates = gemm_rates(gemm_n, gemm_repeats)
    print(f"GEMM rate: {rates_text(start_rates)}")
    chosen = variants(net, str(env["default_precision"]), args.quick)
    flops: dict[int, int] = {}
    rows: list[Row] = []
    for size in sizes:
        x = photo_input(args.data / PHOTO, size, config.preprocess)
        flops[size], size_rows = run_size(net, chosen, x, args.repeats)
        rows += size_rows
    rates = best_rates(start_rates, gemm_rates(gemm_n, gemm_repeats))
    derive(rows, flops, rates)
    report: dict[str, Any] = {"environment": env, "gemm_size": gemm_n, "gemm": rates, "flops": flops}
    report["agreement"] = agreement(net, config.preprocess, max(sizes), args.data)
    report["targets"] = targets(rows, str(env["default_precision"]), rates)
    report["rows"] = [asdict(row) for row in rows]
    report["warning"] = busy_warning(rates, load)
    print()
    print_table(rows, flops)
    print(f"\nGEMM rate at the end: {rates_text({p: r['end'] for p, r in rates.items()})}")
    print(f"agreement: {report['agreement']}")
    print(f"WARNING: {report['warning']}" if report["warning"] else "machine quiet, GEMM rates steady")
    if not report["targets"]:
        print(f"targets not evaluated: {TARGET_SIZE} is not among --sizes")
    for goal in report["targets"]:
        print(f"{goal['result']:<4}  {goal['variant']}: {goal['target']} ({fmt(goal['value'], '.2f')})")
    print("\n" + markdown(report, rows, flops))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
