"""Searching a collection by image, file, indexed image or descriptor."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lookalike.collection import ann
from lookalike.errors import CollectionError
from lookalike.images import load_image
from lookalike.rerank import DEFAULT_N, expand_with

if TYPE_CHECKING:
    import faiss

    from lookalike.collection.collection import Collection, SearchHit

Query = np.ndarray | Image.Image | int | str | Path
BBox = tuple[float, float, float, float]


def query_vector(collection: Collection, query: Query, bbox: BBox | None = None) -> np.ndarray:
    """The raw ``(D,)`` descriptor of a query.

    An ``int`` is an indexed image id; a path that is indexed and unchanged reuses its stored descriptor
    (unless a ``bbox`` asks for a crop, then the file is described cropped); any other file or a PIL image
    is described now. A descriptor cannot be cropped: a ``bbox`` with one is an error.
    """
    if isinstance(query, np.ndarray):
        if bbox is not None:
            raise CollectionError("a bbox crops an image; it cannot apply to a descriptor query")
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        if vector.shape[0] != collection.dim:
            raise CollectionError(
                f"query descriptor has dimension {vector.shape[0]}, the collection {collection.dim}"
            )
        return vector
    if isinstance(query, bool):
        raise CollectionError("a query is an image, a path, an image id or a descriptor")
    if isinstance(query, (int, np.integer)):
        query = int(query)
        if bbox is None:
            return collection.vector(query)
        record = collection.records([query]).get(query)
        if record is None:
            raise CollectionError(f"image {query} is not in {collection.path}")
        query = collection.absolute_path(record.path)
    if isinstance(query, Image.Image):
        return collection.extractor.describe(query.convert("RGB"), bbox=bbox)
    path = Path(query)
    record = collection.record(path)
    if record is not None and record.row is not None and bbox is None and _unchanged(collection, record):
        return collection.vector(record.id)
    if not path.exists() and record is not None:
        path = collection.absolute_path(record.path)
    return collection.extractor.describe(load_image(path), bbox=bbox)


def _unchanged(collection: Collection, record) -> bool:
    try:
        stat = collection.absolute_path(record.path).stat()
    except OSError:
        return True
    return (stat.st_size, stat.st_mtime_ns) == (record.size, record.mtime_ns)


QUERY_RERANKINGS = ("none", "aqe")


def search_vectors(
    collection: Collection, raw: np.ndarray, k: int = 30, rerank: str = "none"
) -> list[list[SearchHit]]:
    """Top-``k`` hits for each raw descriptor row of ``raw`` (Q, D); ``rerank="aqe"`` searches again
    with each query expanded by its first neighbours (αQE, :mod:`lookalike.rerank` defaults)."""
    from lookalike.collection.collection import SearchHit

    if k < 1:
        raise CollectionError("k must be at least 1")
    if rerank not in QUERY_RERANKINGS:
        raise CollectionError(f"rerank must be one of {', '.join(QUERY_RERANKINGS)}, got {rerank!r}")
    index = collection.index()
    if index.ntotal == 0:
        return [[] for _ in range(len(np.atleast_2d(raw)))]
    queries = collection.prepare(np.atleast_2d(raw))
    if rerank == "aqe":
        queries = _expanded(collection, index, queries)
    scores, ids = ann.search(index, queries, k)
    records = collection.records([int(i) for i in np.unique(ids) if i >= 0])
    results = []
    for row_scores, row_ids in zip(scores, ids, strict=True):
        hits: list[SearchHit] = []
        for score, image_id in zip(row_scores, row_ids, strict=True):
            record = records.get(int(image_id))
            if image_id >= 0 and record is not None:
                hits.append(SearchHit(len(hits) + 1, int(image_id), record.path, float(score)))
        results.append(hits)
    return results


def _expanded(collection: Collection, index: faiss.Index, queries: np.ndarray) -> np.ndarray:
    """αQE: each query plus its ``DEFAULT_N`` nearest indexed descriptors weighted by similarity^α."""
    scores, ids = ann.search(index, queries, DEFAULT_N)
    found = ids >= 0
    neighbours = np.zeros((*ids.shape, queries.shape[1]), dtype=np.float32)
    neighbours[found] = collection.prepare(collection.vectors_of([int(i) for i in ids[found]]))
    return expand_with(queries, neighbours, np.where(found, scores, -np.inf))


def search(
    collection: Collection, query: Query, k: int = 30, bbox: BBox | None = None, rerank: str = "none"
) -> list[SearchHit]:
    return search_vectors(collection, query_vector(collection, query, bbox)[None], k, rerank)[0]


@dataclass(frozen=True)
class FileHits:
    """The hits of one query file, or why it could not be read (then ``hits`` is empty)."""

    path: Path
    hits: list[SearchHit]
    error: str | None = None


def search_each(
    collection: Collection, paths: Sequence[str | Path], k: int = 30, rerank: str = "none"
) -> list[FileHits]:
    """Hits for many query files at once, in order; an unreadable file is reported, never dropped."""
    described = list(collection.extractor.describe_files(paths))
    vectors = [r.vector for r in described if r.vector is not None]
    hits = iter(search_vectors(collection, np.stack(vectors), k, rerank) if vectors else [])
    return [
        FileHits(r.path, next(hits)) if r.vector is not None
        else FileHits(r.path, [], r.error.reason if r.error else "unreadable")
        for r in described
    ]  # fmt: skip
