"""A folder's index on disk: SQLite metadata + raw float32 descriptors + a faiss index, kept incrementally.

Layout of a collection directory::

    collection.sqlite   images, contents, settings (schema version in PRAGMA user_version)
    vectors.f32         raw descriptors, one float32 row per distinct content (see vectors.py)
    index.faiss         faiss index of the (whitened) descriptors, ids = image ids; rebuilt when stale
    index.json          the database generation and whitening the index was built from
    whitening.npz       optional whitening applied on top of the raw descriptors
    write.lock          held (flock) by the one process that writes
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np

from lookalike.collection import ann, store
from lookalike.collection import query as querying
from lookalike.collection import sync as syncing
from lookalike.collection.query import BBox, Query
from lookalike.collection.sync import DEFAULT_COMMIT_EVERY, ProgressCallback, SyncReport
from lookalike.collection.vectors import VectorFile
from lookalike.errors import CollectionBusyError, CollectionError, SettingsMismatchError
from lookalike.extract import DescriptorSettings, Extractor
from lookalike.whitening import Whitening, load_whitening, save_whitening

log = logging.getLogger(__name__)

DATABASE, VECTORS, INDEX, INDEX_META, WHITENING, LOCK = (
    "collection.sqlite",
    "vectors.f32",
    "index.faiss",
    "index.json",
    "whitening.npz",
    "write.lock",
)
IDENTITY_KEYS = ("model", "weights_sha256", "pooling", "gem_p", "imsize", "scales", "dim")


@dataclass(frozen=True)
class SearchHit:
    rank: int
    id: int
    path: str
    score: float


@dataclass(frozen=True)
class CollectionInfo:
    path: str
    root: str | None
    schema_version: int
    settings: dict[str, Any]
    images: int
    failed: int
    distinct_contents: int
    whitening: str | None
    disk_bytes: int


def descriptor_identity(settings: DescriptorSettings, extractor: Extractor) -> dict[str, Any]:
    """What makes two descriptors comparable: model and its weights, pooling, p, size, scales, dimension."""
    from lookalike.weights import weights_sha256

    return {
        "model": settings.model,
        "weights_sha256": weights_sha256(extractor.config),
        "pooling": settings.pooling,
        "gem_p": settings.gem_p,
        "imsize": settings.imsize,
        "scales": list(settings.scales),
        "dim": extractor.dim,
    }


def mismatch_message(stored: dict[str, Any], wanted: dict[str, Any]) -> str:
    differences = [
        f"{key}: {stored.get(key)!r} ≠ {wanted.get(key)!r}"
        for key in IDENTITY_KEYS
        if stored.get(key) != wanted.get(key)
    ]
    return (
        "this collection holds descriptors made with other settings ("
        + "; ".join(differences)
        + "). Descriptors of different settings are never mixed: re-index with --rebuild to start over "
        "with the new settings, or omit the options to keep the collection's own."
    )


class Collection:
    """A persistent, incrementally updated index of image descriptors. Use ``create`` or ``open``."""

    def __init__(self, path: Path, readonly: bool) -> None:
        self.path = Path(path)
        self.readonly = readonly
        database = self.path / DATABASE
        if not database.exists():
            raise CollectionError(f"{self.path} is not a lookalike collection (no {DATABASE})")
        self.db = store.connect(database, readonly=readonly)
        try:
            if not readonly:
                store.migrate(self.db)
            elif (version := store.schema_version(self.db)) != store.SCHEMA_VERSION:
                store.refuse_newer(version)
                raise CollectionError(f"{self.path}: schema version {version}; open it writable to migrate")
            self._settings = store.read_settings(self.db)
            if "dim" not in self._settings:
                raise CollectionError(
                    f"{self.path}: incomplete collection (no settings); index with --rebuild"
                )
        except BaseException:
            self.db.close()
            raise
        self.vectors = VectorFile(self.path / VECTORS, int(self._settings["dim"]))
        self._extractor: Extractor | None = None
        self._index: faiss.Index | None = None
        self._index_key: tuple[int, str | None] | None = None
        self._whitening: Whitening | None = None
        self._whitening_stamp: tuple[int, int, int] | None = None
        self._lock_handle: int | None = None

    # -- creating and opening -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, path: str | Path, settings: DescriptorSettings | None = None, root: str | Path | None = None
    ) -> Collection:
        """A new, empty collection at ``path`` for descriptors made with ``settings``."""
        path = Path(path)
        if (path / DATABASE).exists():
            raise CollectionError(f"{path} already holds a collection; open it, or remove it to start over")
        settings = settings or DescriptorSettings()
        extractor = Extractor(settings)
        path.mkdir(parents=True, exist_ok=True)
        identity = descriptor_identity(settings, extractor)
        root_text = str(Path(root).resolve()) if root is not None else None
        # Built under another name and renamed into place: a run killed half-way leaves no database.
        with _exclusive(path):
            if (path / DATABASE).exists():
                raise CollectionError(
                    f"{path} already holds a collection; open it, or remove it to start over"
                )
            building = path / (DATABASE + ".new")
            for leftover in ("", "-wal", "-shm", "-journal"):
                Path(f"{building}{leftover}").unlink(missing_ok=True)
            connection = store.connect(building)
            store.migrate(connection)
            connection.execute("BEGIN IMMEDIATE")
            store.write_settings(
                connection,
                {**identity, "root": root_text, "vector_rows": 0, "generation": 0, "whitening": None},
            )
            connection.execute("COMMIT")
            connection.close()
            os.replace(building, path / DATABASE)
        collection = cls(path, readonly=False)
        collection._extractor = extractor
        return collection

    @classmethod
    def open(cls, path: str | Path, readonly: bool = False) -> Collection:
        return cls(Path(path), readonly)

    @classmethod
    def open_or_create(
        cls,
        path: str | Path,
        settings: DescriptorSettings | None = None,
        root: str | Path | None = None,
        rebuild: bool = False,
    ) -> Collection:
        """Open ``path`` if it holds a collection made with ``settings`` (None: whatever it holds), else create it.

        ``rebuild`` discards an existing collection first. Different settings raise SettingsMismatchError.
        """
        path = Path(path)
        if rebuild and (path / DATABASE).exists():
            with _exclusive(path):
                for name in (
                    DATABASE,
                    DATABASE + "-wal",
                    DATABASE + "-shm",
                    VECTORS,
                    INDEX,
                    INDEX_META,
                    WHITENING,
                ):
                    (path / name).unlink(missing_ok=True)
        if not (path / DATABASE).exists():
            return cls.create(path, settings, root)
        collection = cls.open(path)
        if settings is not None:
            try:
                collection.check_settings(settings)
            except BaseException:
                collection.close()
                raise
        if root is not None and collection.root is None:
            collection._write_settings({"root": str(Path(root).resolve())})
        return collection

    def check_settings(self, settings: DescriptorSettings) -> None:
        extractor = Extractor(settings)
        wanted = descriptor_identity(settings, extractor)
        stored = {key: self._settings.get(key) for key in IDENTITY_KEYS}
        if stored != wanted:
            raise SettingsMismatchError(mismatch_message(stored, wanted))
        self._extractor = extractor

    def close(self) -> None:
        self.db.close()
        self._release_lock()

    def __enter__(self) -> Collection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- settings and parts ---------------------------------------------------------------------------

    @property
    def settings(self) -> dict[str, Any]:
        return dict(self._settings)

    @property
    def descriptor_settings(self) -> DescriptorSettings:
        s = self._settings
        return DescriptorSettings(
            model=str(s["model"]),
            pooling=str(s["pooling"]),
            gem_p=s["gem_p"],  # type: ignore[arg-type]
            imsize=int(s["imsize"]),  # type: ignore[arg-type]
            scales=tuple(s["scales"]),  # type: ignore[arg-type]
        )

    @property
    def root(self) -> Path | None:
        root = self._settings.get("root")
        return Path(str(root)) if root else None

    @property
    def dim(self) -> int:
        return self.vectors.dim

    @property
    def extractor(self) -> Extractor:
        """The descriptor extractor of this collection's settings (built on first use)."""
        if self._extractor is None:
            self._extractor = Extractor(self.descriptor_settings)
            stored = self._settings.get("weights_sha256")
            current = descriptor_identity(self.descriptor_settings, self._extractor)["weights_sha256"]
            if stored != current:
                raise SettingsMismatchError(
                    mismatch_message(self._settings, {**self._settings, "weights_sha256": current})
                )
        return self._extractor

    def _write_settings(self, values: dict[str, Any]) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        store.write_settings(self.db, values)
        self.db.execute("COMMIT")
        self._settings.update(values)

    def refresh_settings(self) -> None:
        self._settings = store.read_settings(self.db)

    # -- writing --------------------------------------------------------------------------------------

    @contextmanager
    def writing(self) -> Iterator[None]:
        """Hold the collection's write lock (one writer at a time, across processes)."""
        if self.readonly:
            raise CollectionError(f"{self.path} was opened read-only")
        if self._lock_handle is not None:
            yield
            return
        handle = os.open(self.path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            raise CollectionBusyError(f"{self.path} is being written by another process") from None
        self._lock_handle = handle
        try:
            self.refresh_settings()
            self.vectors.truncate(int(self._settings["vector_rows"]))
            yield
        finally:
            self._release_lock()

    def _release_lock(self) -> None:
        if self._lock_handle is not None:
            fcntl.flock(self._lock_handle, fcntl.LOCK_UN)
            os.close(self._lock_handle)
            self._lock_handle = None

    def relative_path(self, path: str | Path) -> str:
        """How a file is named in the collection: relative to the root when under it, else absolute."""
        absolute = Path(path).absolute()
        if self.root is not None:
            try:
                return absolute.relative_to(self.root).as_posix()
            except ValueError:
                pass
        return str(absolute)

    def absolute_path(self, name: str) -> Path:
        path = Path(name)
        return path if path.is_absolute() or self.root is None else self.root / path

    def remove(self, paths: Sequence[str | Path]) -> int:
        """Forget these files (paths as indexed, or absolute); returns how many were known."""
        with self.writing():
            ids = [record.id for p in paths if (record := self.record(p)) is not None]
            self.db.execute("BEGIN IMMEDIATE")
            store.delete_images(self.db, ids)
            self._bump_generation()
            self.db.execute("COMMIT")
        return len(ids)

    def _bump_generation(self) -> None:
        generation = int(self._settings.get("generation", 0)) + 1
        store.write_settings(self.db, {"generation": generation})
        self._settings["generation"] = generation

    # -- reading --------------------------------------------------------------------------------------

    def record(self, path: str | Path) -> store.ImageRecord | None:
        found = store.image_by_path(self.db, str(path))
        return found or store.image_by_path(self.db, self.relative_path(path))

    def records(self, ids: list[int]) -> dict[int, store.ImageRecord]:
        return store.images_by_ids(self.db, ids)

    def images(self) -> dict[str, store.ImageRecord]:
        return store.all_images(self.db)

    def raw_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, raw descriptors) of every indexed image, in id order, from one consistent snapshot."""
        self.db.execute("BEGIN")
        try:
            pairs = np.array(list(store.indexed_rows(self.db)), dtype=np.int64).reshape(-1, 2)
        finally:
            self.db.execute("COMMIT")
        return pairs[:, 0], self.vectors.read(pairs[:, 1])

    def vector(self, image_id: int) -> np.ndarray:
        return self.vectors_of([image_id])[0]

    def vectors_of(self, image_ids: Sequence[int]) -> np.ndarray:
        """Raw descriptors ``(len(image_ids), D)`` of indexed images, in the order given."""
        records = self.records(list(image_ids))
        rows = []
        for image_id in image_ids:
            record = records.get(image_id)
            if record is None or record.row is None:
                raise CollectionError(f"image {image_id} is not indexed in {self.path}")
            rows.append(record.row)
        return self.vectors.read(np.array(rows, dtype=np.int64))

    @property
    def whitening(self) -> Whitening | None:
        kind = self._settings.get("whitening")
        if kind is None:
            return None
        stamp = _file_stamp(self.path / WHITENING)
        if self._whitening is None or self._whitening_stamp != stamp:
            self._whitening = load_whitening(self.path / WHITENING)
            self._whitening_stamp = stamp
        return self._whitening

    def set_whitening(self, whitening: Whitening | None) -> None:
        """Apply ``whitening`` on top of the stored descriptors (no re-extraction); None removes it."""
        with self.writing():
            if whitening is not None:
                if whitening.input_dim != self.dim:
                    raise CollectionError(
                        f"whitening expects {whitening.input_dim}-D input, the collection is {self.dim}-D"
                    )
                save_whitening(whitening, self.path / WHITENING)
            self._whitening = whitening
            self._whitening_stamp = _file_stamp(self.path / WHITENING) if whitening is not None else None
            self.db.execute("BEGIN IMMEDIATE")
            store.write_settings(self.db, {"whitening": whitening.kind if whitening else None})
            self._bump_generation()
            self.db.execute("COMMIT")
            self._settings["whitening"] = whitening.kind if whitening else None
            self._index = None

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Raw descriptors → what the index holds (whitened when the collection has whitening)."""
        whitening = self.whitening
        return whitening.apply(raw) if whitening is not None else np.asarray(raw, dtype=np.float32)

    def index(self) -> faiss.Index:
        """The faiss index of the current generation: loaded from disk when fresh, else rebuilt (and saved)."""
        self.refresh_settings()
        key = (int(self._settings.get("generation", 0)), self._settings.get("whitening"))
        if self._index is not None and self._index_key == key:
            return self._index
        meta_path, index_path = self.path / INDEX_META, self.path / INDEX
        try:
            meta = json.loads(meta_path.read_text())
            fresh = (meta["generation"], meta["whitening"]) == key and index_path.exists()
        except (OSError, ValueError, KeyError):
            fresh = False
        if fresh:
            index = ann.load_index(index_path)
        else:
            ids, raw = self.raw_vectors()
            index = ann.build_index(self.prepare(raw) if len(raw) else raw.reshape(0, self._index_dim()), ids)
            if not self.readonly:
                ann.save_index(index, index_path)
                from lookalike.atomic import atomic_write

                with atomic_write(meta_path, "w") as handle:
                    json.dump({"generation": key[0], "whitening": key[1]}, handle)
        self._index, self._index_key = index, key
        return index

    def _index_dim(self) -> int:
        whitening = self.whitening
        return whitening.dim if whitening is not None else self.dim

    def info(self) -> CollectionInfo:
        self.refresh_settings()
        numbers = store.counts(self.db)
        disk = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        public = {k: v for k, v in self._settings.items() if k not in ("vector_rows", "generation")}
        return CollectionInfo(
            path=str(self.path),
            root=str(self.root) if self.root else None,
            schema_version=store.schema_version(self.db),
            settings=public,
            images=numbers["ok"],
            failed=numbers["failed"],
            distinct_contents=numbers["contents"],
            whitening=self._settings.get("whitening"),  # type: ignore[arg-type]
            disk_bytes=disk,
        )

    def info_dict(self) -> dict[str, Any]:
        return asdict(self.info())

    # -- indexing and searching -----------------------------------------------------------------------

    def sync(
        self,
        root: str | Path | None = None,
        progress: ProgressCallback | None = None,
        commit_every: int = DEFAULT_COMMIT_EVERY,
    ) -> SyncReport:
        """Index new and changed images under ``root`` (default: the collection's root), forget deleted ones."""
        folder = Path(root) if root is not None else self.root
        if folder is None:
            raise CollectionError(f"{self.path} has no root folder; pass one")
        if self.root is None:
            self._write_settings({"root": str(folder.resolve())})
        return syncing.sync(self, folder, progress, commit_every)

    def add(
        self,
        paths: Iterable[str | Path],
        progress: ProgressCallback | None = None,
        commit_every: int = DEFAULT_COMMIT_EVERY,
    ) -> SyncReport:
        """Index these files (new or changed ones)."""
        return syncing.add(self, paths, progress, commit_every)

    def search(
        self, query: Query, k: int = 30, bbox: BBox | None = None, rerank: str = "none"
    ) -> list[SearchHit]:
        """The ``k`` most similar indexed images to an image, a file, an image id or a raw descriptor;
        ``rerank="aqe"`` re-ranks by α-weighted query expansion (an indexed query counts itself first)."""
        return querying.search(self, query, k, bbox, rerank)

    def search_files(
        self, paths: Sequence[str | Path], k: int = 30, rerank: str = "none"
    ) -> list[list[SearchHit]]:
        """Hits for many query files at once (unreadable files get no hits)."""
        return querying.search_files(self, paths, k, rerank)

    def search_vectors(self, raw: np.ndarray, k: int = 30, rerank: str = "none") -> list[list[SearchHit]]:
        """Hits for each raw descriptor row of ``raw`` (Q, D)."""
        return querying.search_vectors(self, raw, k, rerank)


def _file_stamp(path: Path) -> tuple[int, int, int] | None:
    """What changes when a file is replaced or rewritten: inode, mtime and size (None: no file)."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    return (stat.st_ino, stat.st_mtime_ns, stat.st_size)


@contextmanager
def _exclusive(path: Path) -> Iterator[None]:
    handle = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CollectionBusyError(f"{path} is being written by another process") from None
        yield
    finally:
        os.close(handle)
