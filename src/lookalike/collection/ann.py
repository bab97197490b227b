"""Nearest-neighbour search with faiss: exact inner product by default, ids = image ids, atomic saves.

Names follow faiss: queries ``xq`` (Q, D), database ``xb`` (N, D), ``k`` → distances ``D`` and ids ``I``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import faiss
import numpy as np

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


def save_index(index: faiss.Index, path: Path) -> None:
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(handle)
    try:
        faiss.write_index(index, temporary)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def load_index(path: Path) -> faiss.Index:
    try:
        return faiss.read_index(str(path))
    except RuntimeError as exc:
        raise CollectionError(f"{path}: unreadable faiss index ({exc})") from exc
