"""What this CPU offers for inference: model name, vector ISA, and the precisions worth using."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from functools import cache

import torch

INTERESTING_FLAGS = (
    "avx2",
    "fma",
    "avx512f",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
)


@dataclass(frozen=True)
class CpuInfo:
    model: str
    cores: int
    flags: frozenset[str]

    @property
    def isa(self) -> list[str]:
        return [flag for flag in INTERESTING_FLAGS if flag in self.flags]

    @property
    def has_bf16(self) -> bool:
        """Native bf16 dot products (AVX512-BF16 or AMX-BF16) that oneDNN uses."""
        hardware = bool({"avx512_bf16", "amx_bf16"} & self.flags)
        return hardware and torch.backends.mkldnn.is_available()

    @property
    def has_int8(self) -> bool:
        return bool({"avx512_vnni", "avx_vnni", "amx_int8"} & self.flags)

    @property
    def precisions(self) -> list[str]:
        return ["fp32"] + (["bf16"] if self.has_bf16 else []) + (["int8"] if self.has_int8 else [])

    def describe(self) -> str:
        return f"{self.model} ({self.cores} cores; {' '.join(self.isa) or 'no AVX2'})"


def _read_cpuinfo() -> tuple[str, frozenset[str]]:
    model, flags = platform.processor() or platform.machine(), frozenset[str]()
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                key = key.strip()
                if key == "model name" and model in ("", platform.machine(), platform.processor()):
                    model = value.strip()
                elif key in ("flags", "Features") and not flags:
                    flags = frozenset(value.split())
    except OSError:
        pass
    return model, flags


@cache
def cpu_info() -> CpuInfo:
    model, flags = _read_cpuinfo()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return CpuInfo(model=model, cores=cores, flags=flags)


M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
KEEP_HEAP_TRIM = 1 << 30


@cache
def keep_heap() -> bool:
    """Ask glibc to keep freed memory instead of returning large blocks to the OS.

    Activations of a CNN at 1024 px are tens of MB each; glibc serves such blocks with mmap and unmaps them
    on free, so every forward pass page-faults hundreds of MB back in (measured: bf16 ResNet-50 at
    1024×768 went from 231 to 177 ms per image with this off). Costs a few hundred MB of resident memory.
    Disabled with ``LOOKALIKE_KEEP_HEAP=0``; a no-op off glibc. Returns whether it was applied.
    """
    if os.environ.get("LOOKALIKE_KEEP_HEAP", "1") == "0" or platform.system() != "Linux":
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_MAX, 0)) and bool(libc.mallopt(M_TRIM_THRESHOLD, KEEP_HEAP_TRIM))
    except (OSError, AttributeError):
        return False
