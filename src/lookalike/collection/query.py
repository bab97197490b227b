"""Searching a collection by image, file, indexed image or descriptor, re-ranked by a chain from
:mod:`lookalike.rerank` (its convention: an indexed query never counts among its own neighbours).

A :class:`Searcher` is given the index to search, the describer that turns query images into descriptors,
and the collection's images (records and raw descriptors) through its constructor; it knows no more of the
collection than the :class:`Images` protocol says.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
from PIL import Image

from lookalike.collection import ann
from lookalike.collection.store import ImageRecord
from lookalike.errors import CollectionError, ImageError
from lookalike.extract import Describer, FileDescriptor, ResolvedDescriptor
from lookalike.images import crop_bbox, load_image
from lookalike.local.features import LocalDescriber, LocalFeatures
from lookalike.rerank import NONE, ArrayDatabase, Chain, Database, parse_chain

Query = np.ndarray | Image.Image | int | str | Path
BBox = tuple[float, float, float, float]


@dataclass(frozen=True)
class SearchHit:
    rank: int
    id: int
    path: str
    score: float


@dataclass(frozen=True)
class FileHits:
    """The hits of one query file, or why it could not be read (then ``hits`` is empty)."""

    path: Path
    hits: list[SearchHit]
    error: str | None = None


class Images(Protocol):
    """What searching reads of a collection: image records, raw descriptors and how the index sees them."""

    @property
    def dim(self) -> int: ...

    def record(self, path: str | Path) -> ImageRecord | None: ...

    def records(self, ids: list[int]) -> dict[int, ImageRecord]: ...

    def absolute_path(self, name: str) -> Path: ...

    def vectors_of(self, image_ids: Sequence[int]) -> np.ndarray: ...

    def raw_vectors(self) -> tuple[np.ndarray, np.ndarray]: ...

    def prepare(self, raw: np.ndarray) -> np.ndarray: ...

    def local_features(self, ids: Sequence[int], describer: LocalDescriber) -> list[LocalFeatures | None]: ...

    def knn_table(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image ids, each one's ``k`` nearest other images and their similarities, kept current
        (:mod:`lookalike.collection.neighbours`)."""
        ...

    def augmented(self, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray] | None:
        """Image ids and the DBA of their indexed vectors, kept current (None: none kept)."""
        ...


class DescribedImages(Images, Protocol):
    """Images that come with the describer of their descriptors."""

    @property
    def describer(self) -> Describer: ...


def query_vector(images: DescribedImages, query: Query, bbox: BBox | None = None) -> np.ndarray:
    """The raw ``(D,)`` descriptor of a query (see :func:`resolve_query`)."""
    return resolve_query(images, images.describer, query, bbox)[0]


def resolve_query(
    images: Images, describer: Describer, query: Query, bbox: BBox | None = None
) -> tuple[np.ndarray, int | None, Image.Image | None]:
    """The raw ``(D,)`` descriptor of a query, its image id when the query *is* an indexed image, and the
    pixels it was described from (cropped to ``bbox``), when it was described now.

    An ``int`` is an indexed image id; a path that is indexed and unchanged reuses its stored descriptor
    (unless a ``bbox`` asks for a crop, then the file is described cropped); any other file or a PIL image
    is described now. A descriptor cannot be cropped: a ``bbox`` with one is an error. A crop, a changed
    file, a PIL image or a descriptor is no indexed image (id None).
    """
    if isinstance(query, np.ndarray):
        if bbox is not None:
            raise CollectionError("a bbox crops an image; it cannot apply to a descriptor query")
        vector = np.asarray(query, dtype=np.float32).reshape(-1)
        if vector.shape[0] != images.dim:
            raise CollectionError(
                f"query descriptor has dimension {vector.shape[0]}, the collection {images.dim}"
            )
        return vector, None, None
    if isinstance(query, bool):
        raise CollectionError("a query is an image, a path, an image id or a descriptor")
    if isinstance(query, (int, np.integer)):
        query = int(query)
        if bbox is None:
            return images.vectors_of([query])[0], query, None
        record = images.records([query]).get(query)
        if record is None:
            raise CollectionError(f"image {query} is not in the collection")
        query = images.absolute_path(record.path)
    if isinstance(query, Image.Image):
        return _described(describer, query.convert("RGB"), bbox)
    path = Path(query)
    record = images.record(path)
    if record is not None and bbox is None and _unchanged(images, record):
        return images.vectors_of([record.id])[0], record.id, None
    if not path.exists() and record is not None:
        path = images.absolute_path(record.path)
    return _described(describer, load_image(path), bbox)


def _described(
    describer: Describer, image: Image.Image, bbox: BBox | None
) -> tuple[np.ndarray, None, Image.Image]:
    vector = describer.describe(image, bbox=bbox)
    return vector, None, crop_bbox(image, bbox) if bbox is not None else image


def indexed_id(images: Images, path: Path) -> int:
    """The image id of a file that is indexed and unchanged since, else −1."""
    record = images.record(path)
    return record.id if record is not None and _unchanged(images, record) else -1


def _unchanged(images: Images, record: ImageRecord) -> bool:
    """Indexed, and the file has its recorded size and mtime (a file that cannot be seen is not changed)."""
    if record.row is None:
        return False
    try:
        stat = images.absolute_path(record.path).stat()
    except OSError:
        return True
    return (stat.st_size, stat.st_mtime_ns) == (record.size, record.mtime_ns)


class IndexedVectors:
    """A collection's index as the :class:`lookalike.rerank.Database` re-rankers search: ids are image ids,
    vectors are the indexed (whitened) descriptors. Its kNN graph (diffusion's ``GraphSource``) and its DBA
    (``AugmentedSource``) are the ones the collection keeps."""

    def __init__(self, images: Images, index: ann.VectorIndex) -> None:
        self.images = images
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
            out[found] = self.images.prepare(self.images.vectors_of([int(i) for i in ids[found]]))
        return out

    def vectors(self) -> tuple[np.ndarray, np.ndarray]:
        ids, raw = self.images.raw_vectors()
        return ids, self.images.prepare(raw)

    def local_features(self, ids: Sequence[int], describer: LocalDescriber) -> list[LocalFeatures | None]:
        return self.images.local_features(ids, describer)

    def knn_graph(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.images.knn_table(k)

    def augmented(self, n: int, alpha: float) -> Database | None:
        found = self.images.augmented(n, alpha)
        return None if found is None else ArrayDatabase(found[1], found[0])


class LazyDescriber:
    """A :class:`Describer` that asks ``build`` for the real one each time it is used, so that holding it
    builds nothing: a search by image id or by descriptor never loads a network."""

    def __init__(self, build: Callable[[], Describer]) -> None:
        self._build = build

    @property
    def resolved(self) -> ResolvedDescriptor:
        return self._build().resolved

    @property
    def dim(self) -> int:
        return self._build().dim

    def describe(self, image: Image.Image, bbox: BBox | None = None) -> np.ndarray:
        return self._build().describe(image, bbox)

    def describe_files(self, paths: Iterable[str | Path]) -> Iterator[FileDescriptor]:
        return self._build().describe_files(paths)


class Searcher:
    """Top-``k`` search of ``index`` (built from ``images``' prepared descriptors, ids = image ids); query
    images and files are described by ``describer``, which is asked for nothing when the query is an indexed
    image or a descriptor."""

    def __init__(self, index: ann.VectorIndex, describer: Describer, images: Images) -> None:
        self.index = index
        self.describer = describer
        self.images = images

    def search(
        self, query: Query, k: int = 30, bbox: BBox | None = None, rerank: str | Chain = NONE
    ) -> list[SearchHit]:
        """Hits for one query (see :func:`resolve_query`), re-ranked by the chain ``rerank``."""
        chain = parse_chain(rerank)
        vector, own, image = resolve_query(self.images, self.describer, query, bbox)
        own_ids = np.array([-1 if own is None else own])
        return self._search(vector[None], own_ids, k, chain, [image] if image is not None else [])[0]

    def search_vectors(
        self,
        raw: np.ndarray,
        k: int = 30,
        rerank: str | Chain = NONE,
        pixels: Sequence[Image.Image | None] = (),
    ) -> list[list[SearchHit]]:
        """Top-``k`` hits for each raw descriptor row of ``raw`` (Q, D), re-ranked by the chain ``rerank``
        (such as ``"dba,aqe"``; see :mod:`lookalike.rerank`). A descriptor has no identity: an indexed copy
        of it is a neighbour like any other. ``pixels``: the image each row describes, where known
        (spatial verification needs it)."""
        return self._search(np.atleast_2d(raw), None, k, parse_chain(rerank), pixels)

    def search_files(
        self, paths: Sequence[str | Path], k: int = 30, rerank: str | Chain = NONE
    ) -> list[FileHits]:
        """Hits for many query files at once, in order; an unreadable file is reported, never dropped. A
        file that is indexed and unchanged is that image, as in :meth:`search`."""
        chain = parse_chain(rerank)
        described = list(self.describer.describe_files(paths))
        vectors = [r.vector for r in described if r.vector is not None]
        own = np.array([indexed_id(self.images, Path(r.path)) for r in described if r.vector is not None])
        pixels = [self._pixels(Path(r.path), chain) for r in described if r.vector is not None]
        found = self._search(np.stack(vectors), own.astype(np.int64), k, chain, pixels) if vectors else []
        hits = iter(found)
        return [
            FileHits(r.path, next(hits)) if r.vector is not None
            else FileHits(r.path, [], r.error.reason if r.error else "unreadable")
            for r in described
        ]  # fmt: skip

    def _pixels(self, path: Path, chain: Chain) -> Image.Image | None:
        """The image of a query file, read again only when a stage of ``chain`` matches pixels."""
        if not chain.needs_pixels or indexed_id(self.images, path) >= 0:
            return None
        try:
            return load_image(path)
        except ImageError:
            return None

    def _search(
        self,
        raw: np.ndarray,
        own: np.ndarray | None,
        k: int,
        chain: Chain,
        pixels: Sequence[Image.Image | None] = (),
    ) -> list[list[SearchHit]]:
        """Hits per raw descriptor row; ``own`` holds each row's image id when it is an indexed image (−1
        when not), which re-ranking never counts among that query's neighbours; ``pixels`` each row's
        image where known."""
        if k < 1:
            raise CollectionError("k must be at least 1")
        if self.index.ntotal == 0:
            return [[] for _ in range(len(raw))]
        database = IndexedVectors(self.images, self.index)
        ranking = chain.search(database, self.images.prepare(raw), k, own, pixels)
        records = self.images.records([int(i) for i in np.unique(ranking.ids) if i >= 0])
        results = []
        for row_scores, row_ids in zip(ranking.scores, ranking.ids, strict=True):
            hits: list[SearchHit] = []
            for score, image_id in zip(row_scores, row_ids, strict=True):
                record = records.get(int(image_id))
                if image_id >= 0 and record is not None:
                    hits.append(SearchHit(len(hits) + 1, int(image_id), record.path, float(score)))
            results.append(hits)
        return results
