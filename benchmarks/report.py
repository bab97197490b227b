"""What every benchmark script records with its figures: the command, the date and the machine, and the
Markdown + JSON pair it writes under ``benchmarks/results/``."""

from __future__ import annotations

import json
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from lookalike.cpu import cpu_info


def command_line(started: float, minutes: bool = False) -> str:
    """``Command: `…` — date, machine, torch, threads, time in all.`` for a run begun at ``started``
    (a :func:`time.perf_counter` value)."""
    elapsed = time.perf_counter() - started
    took = f"{elapsed / 60:.1f} min" if minutes else f"{elapsed:.0f} s"
    return (
        f"Command: `{Path(sys.executable).name} {' '.join(sys.argv)}` — {datetime.now(UTC):%Y-%m-%d}, "
        f"{cpu_info().describe()}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{took} in all."
    )


def write_report(out: Path, text: str, records: Any, **json_options: Any) -> None:
    """``out``.md holds ``text``, ``out``.json the raw ``records``; the folder is created if needed."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(records, indent=1, **json_options))
