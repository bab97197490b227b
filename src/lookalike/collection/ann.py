"""Nearest-neighbour indexes behind one interface: the collection records an index's type and parameters and
builds it through ``INDEX_TYPES``; exact inner product (``flat``) is the one type today. A new type (HNSW,
IVF-PQ, …) is a class with the ``VectorIndex`` methods registered under its name.

Names follow faiss: queries ``xq`` (Q, D), database ``xb`` (N, D), ``k`` → distances ``D`` and ids ``I``.
Ids are image ids; rows are (whitened) L2-normalised float32 descriptors, so inner product is cosine.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import faiss
import numpy as np

from lookalike.atomic import atomic_write
from lookalike.errors import CollectionError, ConfigError

log = logging.getLogger(__name__)


class VectorIndex(Protocol):
    """What the collection needs of an index: add, remove, search, and bytes to save it as."""

    kind: ClassVar[str]

    @property
    def d(self) -> int: ...

    @property
    def ntotal(self) -> int: ...

    def add(self, xb: np.ndarray, ids: np.ndarray) -> None: ...

    def remove(self, ids: np.ndarray) -> None: ...

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def to_bytes(self) -> bytes: ...


@dataclass(frozen=True)
class IndexSpec:
    """An index type and its parameters, as a collection records them (``{"type": "flat", "params": {}}``)."""

    type: str = "flat"
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.type not in INDEX_TYPES:
            raise ConfigError(f"unknown index type {self.type!r}; known: {', '.join(sorted(INDEX_TYPES))}")

    @classmethod
    def from_record(cls, record: object) -> IndexSpec:
        if not isinstance(record, dict) or not isinstance(record.get("type"), str):
            raise CollectionError(f"the recorded index type {record!r} is not readable")
        return cls(record["type"], dict(record.get("params") or {}))

    def record(self) -> dict[str, Any]:
        return {"type": self.type, "params": dict(self.params)}


class FlatIndex:
    """Exact inner-product search (faiss ``IndexIDMap2(IndexFlatIP)``); takes no parameters."""

    kind: ClassVar[str] = "flat"

    def __init__(
        self, d: int, params: dict[str, Any] | None = None, index: faiss.Index | None = None
    ) -> None:
        if params:
            raise ConfigError(f"the flat index takes no parameters, got {params}")
        self.faiss = index if index is not None else faiss.IndexIDMap2(faiss.IndexFlatIP(d))

    @property
    def d(self) -> int:
        return int(self.faiss.d)

    @property
    def ntotal(self) -> int:
        return int(self.faiss.ntotal)

    def add(self, xb: np.ndarray, ids: np.ndarray) -> None:
        if len(xb):
            self.faiss.add_with_ids(_rows(xb), np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> None:
        self.faiss.remove_ids(np.ascontiguousarray(ids, dtype=np.int64))  # type: ignore[arg-type]

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return self.faiss.search(_rows(xq), k)

    def to_bytes(self) -> bytes:
        return faiss.serialize_index(self.faiss).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes, params: dict[str, Any]) -> FlatIndex:
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
        return cls(index.d, params, index)


INDEX_TYPES: dict[str, type[FlatIndex]] = {"flat": FlatIndex}


def _rows(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.atleast_2d(x), dtype=np.float32)


def build_index(xb: np.ndarray, ids: np.ndarray, spec: IndexSpec | None = None) -> VectorIndex:
    """An index of type ``spec`` (default exact flat) holding ``xb`` under ``ids``."""
    spec = spec or IndexSpec()
    index = INDEX_TYPES[spec.type](xb.shape[1], spec.params)
    index.add(xb, ids)
    return index


def search(index: VectorIndex, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` (scores, ids) per query; missing neighbours (k > N) have id -1."""
    xq = _rows(xq)
    if xq.shape[1] != index.d:
        raise CollectionError(f"query has dimension {xq.shape[1]}, the collection {index.d}")
    return index.search(xq, min(k, max(index.ntotal, 1)))


def save_index(index: VectorIndex, path: Path) -> dict[str, object]:
    """Write ``index`` atomically; returns what ``index_problem`` later checks the file against."""
    data = index.to_bytes()
    try:
        with atomic_write(path) as handle:
            handle.write(data)
    except OSError as exc:
        raise CollectionError(f"cannot write {path}: {exc.strerror or exc}") from exc
    return {
        "sha256": hashlib.sha256(data).hexdigest(),
        "ntotal": index.ntotal,
        "d": index.d,
        "type": index.kind,
    }


def save_with_meta(index: VectorIndex, path: Path, meta_path: Path, stamp: Mapping[str, object]) -> None:
    """Save ``index``, then beside it what it was built from (``stamp``) and what ``index_problem`` checks."""
    digest = save_index(index, path)
    with atomic_write(meta_path, "w") as handle:
        json.dump({**stamp, **digest}, handle)


def load_saved(
    path: Path, meta_path: Path, stamp: Mapping[str, object], spec: IndexSpec, dim: int, count: int
) -> VectorIndex | None:
    """The saved index if it was built from ``stamp`` as a ``spec`` index and is intact: its checksum, its
    dimension ``dim`` and its ``count`` of vectors. None (with a warning when the file is damaged) otherwise."""
    try:
        meta = read_meta(meta_path)
        if meta is None or any(meta[key] != value for key, value in stamp.items()):
            return None
        if meta.get("type", "flat") != spec.type:
            return None
        problem = index_problem(path, meta, dim)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if problem is None:
        index = load_index(path, spec)
        if index.ntotal == count:
            return index
        problem = f"it holds {index.ntotal} descriptors, the collection {count}"
    log.warning("%s: %s; the index is rebuilt from the descriptors", path, problem)
    return None


def read_meta(meta_path: Path) -> dict[str, Any] | None:
    """What was recorded when the index was saved (None: it never was); OSError or ValueError when the
    record cannot be read."""
    if not meta_path.exists():
        return None
    meta = json.loads(meta_path.read_text())
    if not isinstance(meta, dict):
        raise ValueError("not a JSON object")
    return meta


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


def load_index(path: Path, spec: IndexSpec | None = None) -> VectorIndex:
    spec = spec or IndexSpec()
    try:
        return INDEX_TYPES[spec.type].from_bytes(path.read_bytes(), spec.params)
    except (RuntimeError, OSError) as exc:
        raise CollectionError(f"{path}: unreadable {spec.type} index ({exc})") from exc
