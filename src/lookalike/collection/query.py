"""Searching a collection by image, file, indexed image or descriptor, re-ranked by a chain from
:mod:`lookalike.rerank` (its convention: an indexed query never counts among its own neighbours)."""

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
from lookalike.rerank import NONE, Chain, parse_chain

if TYPE_CHECKING:
    from lookalike.collection.collection import Collection, SearchHit

Query = np.ndarray | Image.Image | int | str | Path
BBox = tuple[float, float, float, float]


def query_vector(collection: Collection, query: Query, bbox: BBox | None = None) -> np.ndarray:
    """The raw ``(D,)`` descriptor of a query (see :func:`resolve_query`)."""
    return resolve_query(collection, query, bbox)[0]


def resolve_query(
    collection: Collection, query: Query, bbox: BBox | None = None
) -> tuple[np.ndarray, int | None]:
    """The raw ``(D,)`` descriptor of a query, and its image id when the query *is* an indexed image.

    An ``int`` is an indexed image id; a path that is indexed and unchanged reuses its stored descriptor
    (unless a ``bbox`` asks for a crop, then the file is described cropped); any other file or a PIL image
    is described now. A descriptor cannot be cropped: a ``bbox`` with one is an error. A crop, a changed
    file, a PIL image or a descriptor is no indexed image (id None).
    """
    if isinstance(query, np.ndarray):
        if bbox is not None:
            raise CollectionError("a bbox crops an image; it cannot apply to a descriptor query")
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        if vector.shape[0] != collection.dim:
            raise CollectionError(
                f"query descriptor has dimension {vector.shape[0]}, the collection {collection.dim}"
            )
        return vector, None
    if isinstance(query, bool):
        raise CollectionError("a query is an image, a path, an image id or a descriptor")
    if isinstance(query, (int, np.integer)):
        query = int(query)
        if bbox is None:
            return collection.vector(query), query
        record = collection.records([query]).get(query)
        if record is None:
            raise CollectionError(f"image {query} is not in {collection.path}")
        query = collection.absolute_path(record.path)
    if isinstance(query, Image.Image):
        return collection.extractor.describe(query.convert("RGB"), bbox=bbox), None
    path = Path(query)
    record = collection.record(path)
    if record is not None and record.row is not None and bbox is None and _unchanged(collection, record):
        return collection.vector(record.id), record.id
    if not path.exists() and record is not None:
        path = collection.absolute_path(record.path)
    return collection.extractor.describe(load_image(path), bbox=bbox), None


def _indexed_id(collection: Collection, path: Path) -> int:
    """The image id of a file that is indexed and unchanged since, else −1."""
    record = collection.record(path)
    if record is not None and record.row is not None and _unchanged(collection, record):
        return record.id
    return -1


def _unchanged(collection: Collection, record) -> bool:
    try:
        stat = collection.absolute_path(record.path).stat()
    except OSError:
        return True
    return (stat.st_size, stat.st_mtime_ns) == (record.size, record.mtime_ns)


class IndexedVectors:
    """A collection's index as the :class:`lookalike.rerank.Database` re-rankers search: ids are image ids,
    vectors are the indexed (whitened) descriptors."""

    def __init__(self, collection: Collection, index: ann.VectorIndex) -> None:
        self.collection = collection
        self.index = index

    @property
    def dim(self) -> int:
        return int(self.index.d)

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def search(self, xq: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return ann.search(self.index, xq, k)

    def vectors_of(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, np.int64)
        found = ids >= 0
        out = np.zeros((*ids.shape, self.dim), np.float32)
        if found.any():
            out[found] = self.collection.prepare(self.collection.vectors_of([int(i) for i in ids[found]]))
        return out

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        ids, raw = self.collection.raw_vectors()
        return ids, self.collection.prepare(raw)


def search_vectors(
    collection: Collection, raw: np.ndarray, k: int = 30, rerank: str | Chain = NONE
) -> list[list[SearchHit]]:
    """Top-``k`` hits for each raw descriptor row of ``raw`` (Q, D), re-ranked by the chain ``rerank``
    (such as ``"dba,aqe"``; see :mod:`lookalike.rerank`). A descriptor has no identity: an indexed copy of
    it is a neighbour like any other."""
    return _search(collection, np.atleast_2d(raw), None, k, parse_chain(rerank))


def _search(
    collection: Collection, raw: np.ndarray, own: np.ndarray | None, k: int, chain: Chain
) -> list[list[SearchHit]]:
    """Hits per raw descriptor row; ``own`` holds each row's image id when it is an indexed image (−1 when
    not), which re-ranking never counts among that query's neighbours."""
    from lookalike.collection.collection import SearchHit

    if k < 1:
        raise CollectionError("k must be at least 1")
    index = collection.index()
    if index.ntotal == 0:
        return [[] for _ in range(len(raw))]
    ranking = chain.search(IndexedVectors(collection, index), collection.prepare(raw), k, own)
    records = collection.records([int(i) for i in np.unique(ranking.ids) if i >= 0])
    results = []
    for row_scores, row_ids in zip(ranking.scores, ranking.ids, strict=True):
        hits: list[SearchHit] = []
        for score, image_id in zip(row_scores, row_ids, strict=True):
            record = records.get(int(image_id))
            if image_id >= 0 and record is not None:
                hits.append(SearchHit(len(hits) + 1, int(image_id), record.path, float(score)))
        results.append(hits)
    return results


def search(
    collection: Collection, query: Query, k: int = 30, bbox: BBox | None = None, rerank: str | Chain = NONE
) -> list[SearchHit]:
    chain = parse_chain(rerank)
    vector, own = resolve_query(collection, query, bbox)
    return _search(collection, vector[None], np.array([-1 if own is None else own]), k, chain)[0]


@dataclass(frozen=True)
class FileHits:
    """The hits of one query file, or why it could not be read (then ``hits`` is empty)."""

    path: Path
    hits: list[SearchHit]
    error: str | None = None


def search_each(
    collection: Collection, paths: Sequence[str | Path], k: int = 30, rerank: str | Chain = NONE
) -> list[FileHits]:
    """Hits for many query files at once, in order; an unreadable file is reported, never dropped. A file
    that is indexed and unchanged is that image, as in :func:`search`."""
    chain = parse_chain(rerank)
    described = list(collection.extractor.describe_files(paths))
    vectors = [r.vector for r in described if r.vector is not None]
    own = np.array(
        [_indexed_id(collection, Path(r.path)) for r in described if r.vector is not None], np.int64
    )
    hits = iter(_search(collection, np.stack(vectors), own, k, chain) if vectors else [])
    return [
        FileHits(r.path, next(hits)) if r.vector is not None
        else FileHits(r.path, [], r.error.reason if r.error else "unreadable")
        for r in described
    ]  # fmt: skip
