"""Choose the inference precision from the CPU, guarded by a descriptor agreement check.

``auto`` picks bf16 where the CPU has native bf16 dot products (AVX512-BF16, AMX) and keeps it only if, on
the bundled real photos, every bf16 descriptor has cosine ≥ ``MIN_COSINE`` to its fp32 twin and the
nearest-neighbour ranking of the photos is unchanged. The verdict is cached per model, CPU and torch version.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from lookalike.atomic import atomic_write
from lookalike.cpu import cpu_info
from lookalike.network import DescriptorNet, InferenceNet, Precision
from lookalike.registry import ModelConfig
from lookalike.transforms import to_tensor

log = logging.getLogger(__name__)

MIN_COSINE = 0.999
RANK_TIE = 2e-3
CHECK_SIDE = 384
SAMPLE_DIR = Path(__file__).parent / "sample"


def sample_images() -> list[Path]:
    return sorted(SAMPLE_DIR.glob("*.jpg"))


def agreement(reference: DescriptorNet, candidate: InferenceNet, config: ModelConfig) -> tuple[float, bool]:
    """(lowest cosine between fp32 and candidate descriptors, whether neighbour rankings agree)."""
    from lookalike.images import load_image, resize_max_side

    fp32_rows, candidate_rows = [], []
    for path in sample_images():
        tensor = to_tensor(resize_max_side(load_image(path), CHECK_SIDE), config.preprocess)[None]
        with torch.inference_mode():
            fp32_rows.append(reference(tensor)[0].numpy())
        candidate_rows.append(candidate(tensor)[0].numpy())
    a, b = np.stack(fp32_rows), np.stack(candidate_rows)
    cosine = float(np.min(np.sum(a * b, axis=1)))
    return cosine, rankings_agree(a @ a.T, b @ b.T)


def rankings_agree(reference: np.ndarray, candidate: np.ndarray, tie: float = RANK_TIE) -> bool:
    """Whether every pair of neighbours that ``reference`` separates by more than ``tie`` keeps its order."""
    ref_gap = reference[:, :, None] - reference[:, None, :]
    cand_gap = candidate[:, :, None] - candidate[:, None, :]
    return bool(np.all(cand_gap[ref_gap > tie] > 0))


def _verdict_file() -> Path:
    from lookalike.weights import lookalike_home

    return lookalike_home() / "precision.json"


def _verdict_key(config: ModelConfig, pooling: str) -> str:
    info = cpu_info()
    return f"{config.name}|{pooling}|{info.model}|{'+'.join(info.isa)}|torch {torch.__version__}"


def _load_verdicts() -> dict[str, dict]:
    try:
        return json.loads(_verdict_file().read_text())
    except (OSError, ValueError):
        return {}


def _save_verdict(key: str, verdict: dict) -> None:
    path = _verdict_file()
    verdicts = _load_verdicts()
    verdicts[key] = verdict
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "w") as handle:
            json.dump(verdicts, handle, indent=1)
    except OSError as exc:
        log.warning("could not record the precision check in %s: %s", path, exc)


def resolve_precision(reference: DescriptorNet, config: ModelConfig, requested: str) -> Precision:
    """``fp32`` or ``bf16`` as asked; for ``auto``, bf16 only where native and checked to agree."""
    if requested in ("fp32", "bf16"):
        return requested  # type: ignore[return-value]
    if not cpu_info().has_bf16 or not sample_images():
        return "fp32"
    pooling = type(reference.pool).__name__
    key = _verdict_key(config, pooling)
    verdict = _load_verdicts().get(key)
    if verdict is None:
        cosine, same_ranking = agreement(reference, InferenceNet(reference, "bf16"), config)
        verdict = {
            "cosine": cosine,
            "same_ranking": same_ranking,
            "bf16": cosine >= MIN_COSINE and same_ranking,
        }
        log.info("bf16 agreement for %s: min cosine %.5f, ranking %s", config.name, cosine, same_ranking)
        _save_verdict(key, verdict)
    return "bf16" if verdict["bf16"] else "fp32"
