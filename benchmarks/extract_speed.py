"""Descriptor extraction speed on this CPU: images/s per variant, against the naive loop and the machine's limit.

Steps: environment → GEMM rate per precision → network FLOPs per input size → images/s per variant →
fraction of the limit and speed-up over the naive loop → bf16/fp32 descriptor agreement → targets.

* limit(precision) = FLOPs ÷ GEMM rate of that precision: the time the convolutions would take if they ran at
  the speed of one large square matrix product. The GEMM rate is the better of ``torch.mm`` (MKL BLAS for fp32)
  and the same product as a 1×1 convolution (oneDNN, which is what the network's convolutions use).
* FLOPs come from ``torch.utils.flop_counter`` (2 per multiply-add; convolutions and matrix products only).
* Inputs are a real photo (holidays 100000.jpg turned landscape) resized to a 4:3 shape whose long side is
  the size: 224 → 224×168, 512 → 512×384, 1024 → 1024×768 (W×H). Batches repeat that input.

Run: ``.venv/bin/python benchmarks/extract_speed.py [--sizes 224,512,1024] [--repeats N] [--quick]``.
"""

from __future__ import annotations

import argparse
import io
import json
import shlex
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F
from torch.utils.flop_counter import FlopCounterMode

from lookalike.cpu import cpu_info
from lookalike.images import load_image, resize_long_side, resize_max_side
from lookalike.network import DescriptorNet, InferenceNet, build_descriptor_net
from lookalike.precision import resolve_precision
from lookalike.registry import DEFAULT_MODEL, Preprocess, get_model_config
from lookalike.transforms import to_tensor

DATA = Path("/work/shared/data")
PHOTO = "holidays-sample/100000.jpg"
AGREEMENT_GLOBS = ("holidays-sample/*.jpg", "ukbench-sample/*.jpg")
BATCH = 4
TARGET_SIZE, TARGET_FRACTION, TARGET_SPEEDUP = 1024, 0.70, 2.0

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
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/extract_speed.json"))
    parser.add_argument("--data", type=Path, default=DATA, help="folder with holidays-/ukbench-sample")
    parser.add_argument("--quick", action="store_true", help="smaller GEMM, no optional alternatives")
    return parser.parse_args(argv)


def median_seconds(call: Call, repeats: int) -> tuple[float, float, float]:
    """(first call, median, best) wall-clock seconds of ``call``; the first call is the warm-up."""
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(max(1, repeats)):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times), min(times)


# --- GEMM rate ----------------------------------------------------------------------------------------------


def matmul_call(dtype: torch.dtype, n: int) -> Call:
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    return lambda: torch.mm(a, b)


def onednn_call(dtype: torch.dtype, n: int) -> Call:
    """The n×n×n product as a 1×1 convolution over n pixels, channels-last: oneDNN's GEMM kernels."""
    x = torch.randn(1, n, n // 64, 64).to(dtype).contiguous(memory_format=torch.channels_last)
    w = torch.randn(n, n, 1, 1).to(dtype).contiguous(memory_format=torch.channels_last)

    def run() -> object:
        with torch.inference_mode():
            return F.conv2d(x, w)

    return run


def int8_call(n: int) -> Call:
    a = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    b = torch.randint(-128, 128, (n, n), dtype=torch.int8)
    return lambda: torch._int_mm(a, b)


def gflops(call: Call, n: int, repeats: int) -> float:
    return 2 * n**3 / median_seconds(call, repeats)[1] / 1e9


def gemm_rates(n: int, repeats: int) -> dict[str, dict]:
    """GFLOP/s (GOP/s for int8) per precision the CPU offers; ``gflops`` is the rate the limit uses."""
    rates: dict[str, dict] = {}
    for precision in cpu_info().precisions:
        if precision == "int8":
            try:
                rates["int8"] = {"int_mm": gflops(int8_call(n), n, repeats)}
                rates["int8"]["gflops"] = rates["int8"]["int_mm"]
            except (RuntimeError, NotImplementedError) as exc:
                rates["int8"] = {"gflops": None, "note": f"torch._int_mm unsupported: {exc}"[:200]}
            continue
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        mm, conv = gflops(matmul_call(dtype, n), n, repeats), gflops(onednn_call(dtype, n), n, repeats)
        rates[precision] = {"matmul": mm, "onednn_conv1x1": conv, "gflops": max(mm, conv)}
    return rates


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


def naive(net: DescriptorNet) -> Prepare:
    """cirtorch's extract_vectors: eager fp32, default memory format, under no_grad."""

    def prepare(x: torch.Tensor) -> Call:
        def run() -> object:
            with torch.no_grad():
                return net(x)

        return run

    return prepare


def plain(net: nn.Module) -> Prepare:
    return lambda x: lambda: net(x)


def autocast_bf16(net: DescriptorNet) -> Prepare:
    def prepare(x: torch.Tensor) -> Call:
        def run() -> object:
            with torch.autocast("cpu", dtype=torch.bfloat16), torch.inference_mode():
                return net(x)

        return run

    return prepare


def jit_frozen(fast: InferenceNet) -> Prepare:
    """TorchScript trace → freeze → optimize_for_inference (oneDNN conv+ReLU/add fusion)."""
    module = DescriptorNet(fast.features, fast.pool, fast.whiten).eval()  # type: ignore[arg-type]

    def prepare(x: torch.Tensor) -> Call:
        def cast(t: torch.Tensor) -> torch.Tensor:
            return t.to(fast.dtype).contiguous(memory_format=torch.channels_last)

        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            script = torch.jit.optimize_for_inference(torch.jit.freeze(torch.jit.trace(module, cast(x))))

        def run() -> object:
            with torch.no_grad():
                return script(cast(x))

        return run

    return prepare


def compiled(fast: InferenceNet) -> Prepare:
    def prepare(x: torch.Tensor) -> Call:
        torch._dynamo.reset()
        module = torch.compile(fast, dynamic=False)
        module(x)  # compile for this shape now, so setup_s holds the compile time
        return lambda: module(x)

    return prepare


def onnxruntime_fp32(net: DescriptorNet) -> Prepare:
    """The unfused fp32 network exported with torch.onnx (fixed shape); ORT folds and fuses on its own."""
    import onnxruntime as ort

    def prepare(x: torch.Tensor) -> Call:
        buffer = io.BytesIO()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(net, (x,), buffer, dynamo=False, input_names=["x"])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])
        pixels = x.numpy()
        return lambda: session.run(None, {"x": pixels})[0]

    return prepare


def variants(net: DescriptorNet, default: str, quick: bool) -> list[Variant]:
    has_bf16 = cpu_info().has_bf16
    fast = {p: InferenceNet(net, p) for p in ("fp32", "bf16") if p == "fp32" or has_bf16}  # type: ignore[arg-type]
    chosen = [Variant("naive fp32 (cirtorch loop)", "fp32", 1, naive(net))]
    for precision, model in fast.items():
        chosen += [Variant(f"lookalike {precision}", precision, b, plain(model)) for b in (1, BATCH)]
    if quick:
        return chosen
    if has_bf16:
        chosen.append(Variant("autocast bf16, unfused", "bf16", 1, autocast_bf16(net)))
    chosen += [Variant(f"jit freeze+optimize {p}", p, 1, jit_frozen(model)) for p, model in fast.items()]
    chosen.append(Variant(f"torch.compile {default}", default, 1, compiled(fast[default])))
    chosen.append(Variant("onnxruntime fp32", "fp32", 1, onnxruntime_fp32(net)))
    return chosen


def as_array(output: object) -> np.ndarray:
    return np.asarray(output.float() if isinstance(output, torch.Tensor) else output, dtype=np.float32)


def measure(variant: Variant, x: torch.Tensor, reference: np.ndarray, repeats: int, row: Row) -> Row:
    """Fill ``row`` with the timings of ``variant`` on a batch of ``x``; a failure becomes a note."""
    try:
        start = time.perf_counter()
        call = variant.prepare(x.repeat(variant.batch, 1, 1, 1))
        row.setup_s = time.perf_counter() - start
        row.cosine_vs_naive = float(np.min(as_array(call()) @ reference))
        row.first_call_s, row.median_s, row.best_s = median_seconds(call, repeats)
    except Exception as exc:  # an optional backend that will not build or run is a finding, not a crash
        row.note = f"{type(exc).__name__}: {exc}".splitlines()[0][:160]
    return row


def derive(row: Row, flops: int, rates: dict[str, dict], naive_per_image: float | None) -> Row:
    if row.median_s is None:
        return row
    per_image = row.median_s / row.batch
    row.ms_per_image, row.images_per_s = per_image * 1e3, 1 / per_image
    rate = rates.get(row.precision, {}).get("gflops")
    row.limit_fraction = flops / (rate * 1e9) / per_image if rate else None
    row.speedup = naive_per_image / per_image if naive_per_image else None
    return row


def run_size(
    net: DescriptorNet, chosen: list[Variant], x: torch.Tensor, rates: dict[str, dict], repeats: int
) -> tuple[int, list[Row]]:
    """(FLOPs per image, one row per variant) at the input size of ``x``."""
    size = max(x.shape[2:])
    flops = count_flops(net, x)
    with torch.no_grad():
        reference = net(x)[0].numpy()
    shape = f"{x.shape[3]}×{x.shape[2]}"
    rows = []
    for variant in chosen:
        row = Row(size, shape, variant.name, variant.precision, variant.batch)
        rows.append(measure(variant, x, reference, repeats, row))
        print(f"  {shape:>9}  {variant.name:<28} ×{variant.batch}  {row.median_s or 0:.3f} s  {row.note}")
    naive_time = rows[0].median_s
    return flops, [derive(r, flops, rates, naive_time) for r in rows]


# --- agreement, targets, reports ----------------------------------------------------------------------------


def agreement(net: DescriptorNet, preprocess: Preprocess, side: int, data: Path) -> dict[str, float]:
    """Lowest cosine between the naive fp32 descriptors and lookalike's, per precision, on real photos."""
    paths = sorted(p for pattern in AGREEMENT_GLOBS for p in data.glob(pattern))
    precisions = [p for p in ("fp32", "bf16") if p == "fp32" or cpu_info().has_bf16]
    models = {p: InferenceNet(net, p) for p in precisions}  # type: ignore[arg-type]
    lowest = {p: 1.0 for p in precisions}
    for path in paths:
        x = to_tensor(resize_max_side(load_image(path), side), preprocess)[None]
        with torch.no_grad():
            ref = net(x)[0].numpy()
        for p, model in models.items():
            lowest[p] = min(lowest[p], float(model(x)[0].numpy() @ ref))
    return {"images": len(paths), "side": side, **{f"min_cosine_{p}": c for p, c in lowest.items()}}


def targets(rows: list[Row], default: str, rates: dict[str, dict]) -> list[dict]:
    """The issue's targets at 1024 px for lookalike at its default precision, one image and batched."""
    faster = (rates.get("bf16", {}).get("gflops") or 0.0) > rates["fp32"]["gflops"]
    found = []
    for row in rows:
        if row.size != TARGET_SIZE or row.variant != f"lookalike {default}":
            continue
        fraction = row.limit_fraction or 0.0
        found.append(
            {
                "variant": f"{row.variant} ×{row.batch}",
                "target": f"≥ {TARGET_FRACTION:.0%} of limit",
                "value": row.limit_fraction,
                "result": "PASS" if fraction >= TARGET_FRACTION else "MISS",
            }
        )
        speedup = row.speedup or 0.0
        result = ("PASS" if speedup >= TARGET_SPEEDUP else "MISS") if faster else "n/a (no faster precision)"
        found.append(
            {
                "variant": f"{row.variant} ×{row.batch}",
                "target": f"≥ {TARGET_SPEEDUP:g}× naive",
                "value": row.speedup,
                "result": result,
            }
        )
    return found


def fmt(value: float | None, spec: str) -> str:
    return "–" if value is None else format(value, spec)


def table_cells(row: Row, flops: dict[int, int]) -> list[str]:
    return [
        row.shape,
        fmt(flops[row.size] / 1e9, ".1f"),
        row.variant,
        str(row.batch),
        fmt(row.ms_per_image, ".1f"),
        fmt(row.images_per_s, ".2f"),
        fmt(row.limit_fraction and row.limit_fraction * 100, ".0f"),
        fmt(row.speedup, ".2f"),
        fmt(row.cosine_vs_naive, ".5f"),
        row.note
        or (f"setup {row.setup_s:.1f} s, first call {row.first_call_s:.2f} s" if row.setup_s else ""),
    ]


HEADER = [
    "input W×H",
    "GFLOP",
    "variant",
    "batch",
    "ms/image",
    "images/s",
    "% limit",
    "× naive",
    "cos",
    "note",
]


def print_table(rows: list[Row], flops: dict[int, int]) -> None:
    cells = [HEADER] + [table_cells(row, flops) for row in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(HEADER))]
    for line in cells:
        print(
            "  ".join(
                c.ljust(w) if i in (2, 9) else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )


def rates_text(rates: dict[str, dict]) -> str:
    return (
        ", ".join(f"{p} {fmt(r.get('gflops'), '.0f')}" for p, r in rates.items()) + " GFLOP/s (int8: GOP/s)"
    )


def markdown(report: dict, rows: list[Row], flops: dict[int, int]) -> str:
    env, agree = report["environment"], report["agreement"]
    lines = [
        f"#### `{env['command']}`",
        "",
        f"{env['cpu']} · torch {env['torch']} · {env['threads']} threads · {env['date']}",
        f"GEMM rate: {rates_text(report['gemm'])}. Default precision: {env['default_precision']}.",
        "Min cosine to naive fp32 on "
        + f"{agree['images']} photos: "
        + ", ".join(
            f"{k.removeprefix('min_cosine_')} {v:.5f}" for k, v in agree.items() if k.startswith("min")
        ),
        "",
        "| " + " | ".join(HEADER[:-2]) + " |",
        "|" + "---|" * (len(HEADER) - 2),
    ]
    lines += ["| " + " | ".join(table_cells(row, flops)[:-2]) + " |" for row in rows if row.median_s]
    lines += [
        f"- {t['variant']}: {t['target']} → {t['result']} ({fmt(t['value'], '.2f')})"
        for t in report["targets"]
    ]
    return "\n".join(lines)


def environment(args: argparse.Namespace, default: str) -> dict[str, object]:
    info = cpu_info()
    return {
        "command": shlex.join([".venv/bin/python", *sys.argv]),
        "cpu": info.describe(),
        "isa": info.isa,
        "precisions": info.precisions,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "python": sys.version.split()[0],
        "model": args.model,
        "default_precision": default,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    torch.manual_seed(0)
    config = get_model_config(args.model)
    net = build_descriptor_net(config, "gem")
    default = resolve_precision(net, config, "auto")
    env = environment(args, default)
    print(f"{env['cpu']}\ntorch {env['torch']}, {env['threads']} threads, {env['date']}")
    rates = gemm_rates(2048 if args.quick else 4096, args.repeats)
    print(f"GEMM rate: {rates_text(rates)}")
    chosen = variants(net, default, args.quick)
    flops: dict[int, int] = {}
    rows: list[Row] = []
    for size in sizes:
        x = photo_input(args.data / PHOTO, size, config.preprocess)
        flops[size], size_rows = run_size(net, chosen, x, rates, args.repeats)
        rows += size_rows
    agree = agreement(net, config.preprocess, max(sizes), args.data)
    goals = targets(rows, default, rates)
    report = {"environment": env, "gemm": rates, "flops": flops, "agreement": agree, "targets": goals}
    report["rows"] = [asdict(row) for row in rows]
    print()
    print_table(rows, flops)
    print(f"\nagreement: {agree}")
    for goal in goals:
        print(f"{goal['result']:<4}  {goal['variant']}: {goal['target']} ({fmt(goal['value'], '.2f')})")
    print("\n" + markdown(report, rows, flops))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
