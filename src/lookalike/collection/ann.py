"""Nearest-neighbour search with faiss: exact inner product by default, ids = image ids, atomic saves.

Names follow faiss: queries ``xq`` (Q, D), database ``xb`` (N, D), ``k`` → distances ``D`` and ids ``I``.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import faiss
import numpy as np

from lookalike.atomic import atomic_write
from lookalike.errors import CollectionError


def build_index(xb: np.ndarray, ids: np.ndarray) -> faiss.Index:
    """An exact inner-product index (cosine on L2-normalised rows) whose ids are ``ids``."""
    xb = np.ascontiguousarray(xb, dtype=np.float32)
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(xb.shape[1]))
    if len(xb):
        index.add_with_ids(xb, np.ascontiguousarray(ids, dtype=np.int64))
    return index


def search(index: faiss.Index, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query; missing neighbours (k > N) have id -1."""
    xq = np.ascontiguousarray(np.atleast_2d(xq), dtype=np.float32)
    if xq.shape[1] != index.d:
        raise CollectionError(f"query has dimension {xq.shape[1]}, the collection {index.d}")
    return index.search(xq, min(k, max(index.ntotal, 1)))


def save_index(index: faiss.Index, path: Path) -> dict[str, object]:
    """Write ``index`` atomically; returns what ``index_problem`` later checks the file against."""
    data = faiss.serialize_index(index).tobytes()
    try:
        with atomic_write(path) as handle:
            handle.write(data)
    except OSError as exc:
        raise CollectionError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return {"sha256": hashlib.sha256(data).hexdigest(), "ntotal": int(index.ntotal), "d": int(index.d)}


def index_problem(path: Path, recorded: dict, dim: int) -> str | None:
    """What is wrong with a saved index file against what was recorded when it was saved (None: intact)."""
    if "sha256" not in recorded:
        return "no checksum was recorded for it"
    try:
        with open(path, "rb") as handle:
            digest = hashlib.file_digest(handle, "sha256").hexdigest()
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    if digest != recorded["sha256"]:
        return "its checksum does not match the one recorded when it was saved (damaged on disk)"
    if recorded.get("d") != dim:
        return f"it has dimension {recorded.get('d')}, the collection {dim}"
    return None


def load_index(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise CollectionError(f"{path}: unreadable faiss index ({exc})") from exc
