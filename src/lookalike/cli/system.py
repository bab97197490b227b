"""`lookalike system`: what this machine offers and which precision lookalike picks."""

from __future__ import annotations

import torch
import typer

from lookalike.cli.common import console, print_json
from lookalike.cpu import cpu_info
from lookalike.weights import lookalike_home


def system(as_json: bool = typer.Option(False, "--json")) -> None:
    """CPU model, vector ISA, precisions available, torch version and threads, cache folder."""
    info = cpu_info()
    record = {
        "cpu": info.model,
        "cores": info.cores,
        "isa": info.isa,
        "precisions": info.precisions,
        "auto_precision": "bf16 (after an agreement check)" if info.has_bf16 else "fp32",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "home": str(lookalike_home()),
    }
    if as_json:
        print_json(record)
        return
    for key, value in record.items():
        console.print(f"[bold]{key:>15}[/]  {' '.join(value) if isinstance(value, list) else value}")
