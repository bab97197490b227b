"""The server's hold on one collection: the model, the index and the SQLite connection, shared safely by
concurrent requests.

Neither the extractor (torch) nor the collection's SQLite connection may be used by two threads at once, so
each gets one thread of its own: descriptors are computed in a single inference thread, and every read of
the collection (SQLite, the descriptor file, the faiss index) happens in a single store thread. Requests
wait for those threads without holding one. Decoding uploads and making thumbnails touch neither and run
in a small pool (``decode_threads``) so a large upload does not hold up the model. Indexed files are opened
there only as ``files.open_indexed`` allows: inside the collection's folder, regular, unchanged.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from PIL import Image

from lookalike.collection import Collection, SearchHit
from lookalike.collection.collection import BBox
from lookalike.collection.store import ImageRecord
from lookalike.errors import NoReferencesError
from lookalike.images import load_image_bytes
from lookalike.recognize import Prediction, Recognizer, RecognizerOptions
from lookalike.serve.errors import ApiError
from lookalike.serve.files import THUMBS, OpenedFile, Rehashed, ThumbnailCache, media_type, open_indexed
from lookalike.serve.params import MAX_ID
from lookalike.serve.settings import ServeSettings

log = logging.getLogger(__name__)

T = TypeVar("T")


class Engine:
    """Searches, records and files of one collection, opened read-only; use ``Engine.open``."""

    def __init__(
        self, collection: Collection, settings: ServeSettings, recognizer: Recognizer | None = None
    ) -> None:
        self.collection = collection
        self.settings = settings
        self.recognizer = recognizer
        self.thumbnails = ThumbnailCache(collection.path / THUMBS, settings.thumb_size, settings.max_pixels)
        # The root as it resolves when the server starts: files indexed under it are served from inside it.
        self._root = Path(os.path.realpath(collection.root)) if collection.root is not None else None
        self._inference = ThreadPoolExecutor(1, thread_name_prefix="lookalike-inference")
        self._store = ThreadPoolExecutor(1, thread_name_prefix="lookalike-store")
        self._files = ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="lookalike-files")
        self._rehashed = Rehashed()
        self._waiting = 0  # searches queued for or in the inference thread (counted on the event loop)

    @classmethod
    def open(
        cls,
        path: str | Path,
        settings: ServeSettings | None = None,
        recognition: RecognizerOptions | None = None,
    ) -> Engine:
        """Open the collection, load the model and the index, and run the model once so it is warm.

        Recognition (``/api/recognize``) uses the collection's labelled images as references, with
        ``recognition`` or the default options; a collection without labelled images is served without it,
        unless ``recognition.labels`` names a file, whose errors are raised."""
        collection = Collection.open(path, readonly=True)
        try:
            extractor = collection.extractor
            extractor.describe(Image.new("RGB", (64, 64), (128, 128, 128)))
            index = collection.index()
            recognizer = _recognizer(collection, recognition or RecognizerOptions())
            log.info(
                "serving %s: %d images, %s (%s), recognition %s",
                path,
                index.ntotal,
                extractor.config.name,
                extractor.precision,
                f"over {len(recognizer.labels)} references" if recognizer else "off (no labelled images)",
            )
        except BaseException:
            collection.close()
            raise
        return cls(collection, settings or ServeSettings(), recognizer)

    def close(self) -> None:
        """Finish the work under way, then close the collection."""
        for executor in (self._inference, self._files, self._store):
            executor.shutdown(wait=True, cancel_futures=True)
        self.collection.close()

    @property
    def model(self) -> str:
        return self.collection.extractor.config.name

    @property
    def precision(self) -> str:
        return self.collection.extractor.precision

    async def _run(self, executor: Executor, function: Callable[..., T], *args: Any) -> T:
        return await asyncio.wrap_future(executor.submit(function, *args))

    # -- images in, descriptors out -------------------------------------------------------------------

    async def decode(self, data: bytes, name: str) -> Image.Image:
        """An uploaded image, content sniffed (raises the library's ImageError kinds)."""
        return await self._run(self._files, load_image_bytes, data, name, self.settings.max_pixels)

    async def load(self, record: ImageRecord) -> Image.Image:
        """The pixels of an indexed image, from its checked file (see ``open_file``)."""
        return await self._run(self._files, self._load, record)

    async def describe(self, image: Image.Image, bbox: BBox | None = None) -> np.ndarray:
        """The raw descriptor of an image, computed in the inference thread (503 when too many wait)."""
        if self._waiting >= self.settings.max_waiting:
            raise ApiError(
                503, "busy", f"{self._waiting} searches are waiting for the model", {"Retry-After": "1"}
            )
        self._waiting += 1
        try:
            return await self._run(self._inference, self.collection.extractor.describe, image, bbox)
        finally:
            self._waiting -= 1

    # -- reading the collection (store thread) --------------------------------------------------------

    async def search(
        self, query: np.ndarray | int, k: int, rerank: str = "none", image: Image.Image | None = None
    ) -> list[SearchHit]:
        """Top-``k`` hits for a raw descriptor or an indexed image id, re-ranked by the chain ``rerank``;
        ``image`` is the picture a descriptor was made from (spatial verification matches it)."""
        return await self._run(self._store, self._search, query, k, rerank, image)

    def _search(
        self, query: np.ndarray | int, k: int, rerank: str, image: Image.Image | None
    ) -> list[SearchHit]:
        if isinstance(query, np.ndarray) and image is not None:
            return self.collection.search_vectors(query[None], k, rerank, [image])[0]
        return self.collection.search(query, k, None, rerank)

    async def recognize(self, query: np.ndarray | int) -> Prediction:
        """The label of a raw descriptor or an indexed image id (409 when nothing is labelled)."""
        recognizer = self.recognizer
        if recognizer is None:
            raise ApiError(
                409,
                "no references",
                "recognition needs labelled images: index them in one folder per class below the "
                "collection root, or start the server with --labels CSV",
            )
        return await self._run(self._store, recognizer.recognize, query)

    async def records(self, ids: list[int]) -> dict[int, ImageRecord]:
        return await self._run(self._store, self.collection.records, ids)

    async def record(self, image_id: int) -> ImageRecord:
        """The indexed image with this id; 404 when there is none (or it failed to index)."""
        record = (await self.records([image_id])).get(image_id) if 1 <= image_id <= MAX_ID else None
        if record is None or record.status != "ok":
            raise ApiError(404, "unknown image", f"no indexed image has id {image_id}")
        return record

    async def indexed(self) -> int:
        return await self._run(self._store, lambda: int(self.collection.index().ntotal))

    async def info(self) -> dict[str, Any]:
        return await self._run(self._store, self.collection.info_dict)

    # -- files ----------------------------------------------------------------------------------------

    def file(self, record: ImageRecord) -> Path:
        """Where an indexed image is on disk: only ever a path recorded in the collection."""
        return self.collection.absolute_path(record.path)

    def folder(self, record: ImageRecord) -> Path:
        """The folder an indexed file must lie in: the root, or for a file indexed outside the root (its
        path recorded absolute, its folder resolved when it was indexed) that folder."""
        if Path(record.path).is_absolute() or self._root is None:
            return Path(record.path).parent
        return self._root

    async def open_file(self, record: ImageRecord) -> tuple[OpenedFile, str]:
        """The checked, open file of an indexed image and its content type; close it (or send it with
        ``OpenedFileResponse``). 404 or 409 when it is not the regular file that was indexed."""
        future = self._files.submit(self._open_with_type, record)
        try:
            return await asyncio.wrap_future(future)
        except asyncio.CancelledError:
            future.add_done_callback(_close_opened)  # the request went away: nobody else will close it
            raise

    async def thumbnail(self, record: ImageRecord) -> Path | bytes:
        return await self._run(self._files, self._thumbnail, record)

    def _open(self, record: ImageRecord) -> OpenedFile:
        return open_indexed(record, self.file(record), self.folder(record), self._rehashed)

    def _open_with_type(self, record: ImageRecord) -> tuple[OpenedFile, str]:
        opened = self._open(record)
        try:
            return opened, media_type(opened)
        except BaseException:
            opened.close()
            raise

    def _load(self, record: ImageRecord) -> Image.Image:
        opened = self._open(record)
        try:
            return load_image_bytes(opened.read(), opened.name, self.settings.max_pixels)
        finally:
            opened.close()

    def _thumbnail(self, record: ImageRecord) -> Path | bytes:
        assert record.sha256 is not None
        opened = self._open(record)
        try:
            return self.thumbnails.get(opened, record.sha256)
        finally:
            opened.close()


def _close_opened(future: Future[tuple[OpenedFile, str]]) -> None:
    if not future.cancelled() and future.exception() is None:
        future.result()[0].close()


def _recognizer(collection: Collection, options: RecognizerOptions) -> Recognizer | None:
    try:
        return options.build(collection)
    except NoReferencesError:
        if options.labels is not None:
            raise
        return None
