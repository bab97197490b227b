"""A folder's index on disk: SQLite metadata + raw float32 descriptors + a vector index, kept incrementally.

:class:`Collection` composes the parts: the database (:mod:`.store`, which holds all SQL), the descriptor
file (:mod:`.vectors`), the index (:mod:`.ann`), a :class:`~.query.Searcher` and a :class:`~.sync.Syncer`,
each given the index or the describer it works with. :mod:`.layout` lists the files of a collection.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lookalike.atomic import file_sha256, file_stamp, replace
from lookalike.collection import ann, recovery, store
from lookalike.collection.info import IDENTITY_KEYS, CollectionInfo, mismatch_message
from lookalike.collection.layout import DATABASE, INDEX, INDEX_META, REBUILT, VECTORS, WHITENING, write_lock
from lookalike.collection.local import SETTING as LOCAL_SETTING
from lookalike.collection.local import LocalFeatureSettings, StoredLocalFeatures
from lookalike.collection.neighbours import StoredNeighbours, augmentation_setting, neighbours_setting
from lookalike.collection.query import BBox, FileHits, LazyDescriber, Query, Searcher, SearchHit
from lookalike.collection.sync import DEFAULT_COMMIT_EVERY, ProgressCallback, Syncer, SyncReport
from lookalike.collection.vectors import VectorFile, row_checksums
from lookalike.errors import CollectionError, DamagedCollectionError, SettingsMismatchError
from lookalike.extract import Describer, DescriptorSettings, Extractor, resolve_descriptor
from lookalike.local.features import LocalDescriber, LocalFeatures
from lookalike.rerank import DEFAULT_ALPHA, Chain
from lookalike.rerank.diffusion import DEFAULT_K
from lookalike.walk import canonical_path
from lookalike.whitening import Whitening, load_whitening, save_whitening

__all__ = ["INDEX", "INDEX_META", "VECTORS", "BBox", "Collection", "CollectionInfo", "SearchHit"]

log = logging.getLogger(__name__)


class Collection:
    """A persistent, incrementally updated index of image descriptors. Use ``create`` or ``open``."""

    def __init__(self, path: Path, readonly: bool, verify: bool = True) -> None:
        self.path = Path(path)
        self.readonly = readonly
        database = self.path / DATABASE
        if not database.exists():
            raise CollectionError(f"{self.path} is not a lookalike collection (no {DATABASE})")
        with store.storage_errors(database):
            self.db = store.connect(database, readonly=readonly)
        try:
            with store.storage_errors(database):
                self._settings = self._open_database(readonly)
            self.vectors = VectorFile(self.path / VECTORS, int(self._settings["dim"]))
            if verify:
                self.vectors.require_rows(int(self._settings["vector_rows"]))
        except BaseException:
            self.db.close()
            raise
        self._extractor: Extractor | None = None
        self._requested: DescriptorSettings | None = None  # as asked for (precision included), when known
        self._index: ann.VectorIndex | None = None
        self._index_key: dict[str, object] | None = None
        self._whitening: Whitening | None = None
        self._whitening_stamp: tuple[int, int, int] | None = None
        self._lock_handle: int | None = None
        self._local: StoredLocalFeatures | None = None
        self.neighbours = StoredNeighbours(self.db, self.path, self)

    def _open_database(self, readonly: bool) -> dict[str, Any]:
        if not readonly:
            store.migrate(self.db)
        elif (version := store.schema_version(self.db)) != store.SCHEMA_VERSION:
            store.refuse_newer(version)
            raise CollectionError(f"{self.path}: schema version {version}; open it writable to migrate")
        settings = store.read_settings(self.db)
        if "dim" not in settings:
            raise CollectionError(f"{self.path}: incomplete collection (no settings); index with --rebuild")
        return settings

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
        identity = resolve_descriptor(settings).identity()
        path.mkdir(parents=True, exist_ok=True)
        root_text = str(Path(root).resolve()) if root is not None else None
        # Built under another name and renamed into place: a run killed half-way leaves no database.
        with write_lock(path):
            if (path / DATABASE).exists():
                raise CollectionError(
                    f"{path} already holds a collection; open it, or remove it to start over"
                )
            building = path / (DATABASE + ".new")
            for leftover in ("", "-wal", "-shm", "-journal"):
                Path(f"{building}{leftover}").unlink(missing_ok=True)
            connection = store.connect(building)
            store.migrate(connection)
            initial = {**identity, "root": root_text, "vector_rows": 0, "generation": 0, "whitening": None,
                       "index": ann.IndexSpec().record()}  # fmt: skip
            with store.transaction(connection):
                store.write_settings(connection, initial)
            connection.close()
            recovery.write_mirror(path, initial)
            replace(building, path / DATABASE)
        collection = cls(path, readonly=False)
        collection._requested = settings
        return collection

    @classmethod
    def open(cls, path: str | Path, readonly: bool = False, verify: bool = True) -> Collection:
        """Open an existing collection. The cheap checks (database readable, descriptor file as long as the
        database says) run first and refuse a damaged collection, naming ``lookalike check --repair``;
        ``verify=False`` skips them (for the checker itself)."""
        return cls(Path(path), readonly, verify)

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
            with write_lock(path):
                for name in REBUILT:
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
        """Refuse settings whose descriptors would differ from the stored ones, before any weights load."""
        wanted = resolve_descriptor(settings).identity()
        stored = {key: self._settings.get(key) for key in IDENTITY_KEYS}
        if stored != wanted:
            raise SettingsMismatchError(mismatch_message(stored, wanted))
        self._requested = settings

    def close(self) -> None:
        self.db.close()

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
            extractor = Extractor(self._requested or self.descriptor_settings)
            current = extractor.resolved.identity()
            if current["weights_sha256"] != self._settings.get("weights_sha256"):
                raise SettingsMismatchError(mismatch_message(self._settings, {**self._settings, **current}))
            self._extractor = extractor
        return self._extractor

    @property
    def describer(self) -> Describer:
        """The collection's describer: the :attr:`extractor`, built only when something is to be described
        (a search by image id or by descriptor never loads the network)."""
        return LazyDescriber(lambda: self.extractor)

    def _write_settings(self, values: dict[str, Any]) -> None:
        with self._storage(), store.transaction(self.db):
            store.write_settings(self.db, values)
        self._settings.update(values)
        recovery.write_mirror(self.path, self._settings)

    def _storage(self) -> AbstractContextManager[None]:
        """SQLite failures as a CollectionError that names the problem and the way out."""
        return store.storage_errors(self.path / DATABASE)

    def refresh_settings(self) -> None:
        with self._storage():
            self._settings = store.read_settings(self.db)

    # -- writing --------------------------------------------------------------------------------------

    @contextmanager
    def writing(self, trim: bool = True) -> Iterator[None]:
        """Hold the collection's write lock (one writer at a time, across processes). ``trim`` drops
        descriptor rows a killed run wrote but never committed (the checker opts out to see them)."""
        if self.readonly:
            raise CollectionError(f"{self.path} was opened read-only")
        if self._lock_handle is not None:
            yield
            return
        with write_lock(self.path) as handle:
            self._lock_handle = handle
            try:
                self.refresh_settings()
                if trim:
                    self._trim_uncommitted_rows()
                yield
            finally:
                self._lock_handle = None

    def _trim_uncommitted_rows(self) -> None:
        """Drop descriptor rows past the committed count, after checking the database agrees with that count
        (a damaged count must not cut off committed descriptors)."""
        rows = int(self._settings["vector_rows"])
        with self._storage():
            used = store.next_row(self.db)
        if used > rows:
            raise DamagedCollectionError(
                f"{self.path}: the database records {rows} descriptor rows but refers to row {used - 1}; run "
                f"`lookalike check -c {self.path}`"
            )
        self.vectors.truncate(rows)

    def relative_path(self, path: str | Path) -> str:
        """How a file is named in the collection: relative to the root when under it, else absolute.

        The name is canonical: the folder part is resolved (``..``, symlinked folders, the current folder),
        so one file reached by any spelling of its path gets one name and is stored once.
        """
        absolute = canonical_path(path)
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
            with self._storage(), store.transaction(self.db):
                store.delete_images(self.db, ids)
                self._bump_generation()
            self.neighbours.upkeep()
        return len(ids)

    def _bump_generation(self) -> None:
        self._settings["generation"] = store.bump_generation(self.db)

    # -- reading --------------------------------------------------------------------------------------

    def record(self, path: str | Path) -> store.ImageRecord | None:
        with self._storage():
            found = store.image_by_path(self.db, str(path))
            return found or store.image_by_path(self.db, self.relative_path(path))

    def records(self, ids: list[int]) -> dict[int, store.ImageRecord]:
        with self._storage():
            return store.images_by_ids(self.db, ids)

    def images(self) -> dict[str, store.ImageRecord]:
        with self._storage():
            return store.all_images(self.db)

    def raw_vectors(self) -> tuple[np.ndarray, np.ndarray]:
        """(image ids, raw descriptors) of every indexed image, in id order, from one consistent snapshot."""
        with self._storage():
            pairs = np.array(store.indexed_rows(self.db), dtype=np.int64).reshape(-1, 2)
        return pairs[:, 0], self.verified_rows(pairs[:, 1])

    def verified_rows(self, rows: np.ndarray) -> np.ndarray:
        """Descriptor rows ``(len(rows), D)`` checked against the crc32 recorded when each was written: a row
        damaged on disk raises DamagedCollectionError instead of ranking anything."""
        vectors = self.vectors.read(rows)
        with self._storage():
            recorded = store.content_checksums(self.db, None if len(rows) > 500 else rows.tolist())
        bad = [int(r) for r, crc in zip(rows.tolist(), row_checksums(vectors), strict=True)
               if recorded.get(int(r)) not in (None, crc)]  # fmt: skip
        if bad:
            raise DamagedCollectionError(
                f"{self.vectors.path}: {len(bad)} descriptor rows differ from what was written (row {bad[0]}"
                f"{', …' if len(bad) > 1 else ''}). Run `lookalike check -c {self.path} --repair`"
            )
        return vectors

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
        return self.verified_rows(np.array(rows, dtype=np.int64))

    @property
    def whitening(self) -> Whitening | None:
        kind = self._settings.get("whitening")
        if kind is None:
            return None
        stamp = file_stamp(self.path / WHITENING)
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
            self._whitening_stamp = file_stamp(self.path / WHITENING) if whitening is not None else None
            kind, digest = (whitening.kind, file_sha256(self.path / WHITENING)) if whitening else (None, None)
            recorded: dict[str, Any] = {"whitening": kind, "whitening_sha256": digest}  # see .neighbours
            with self._storage(), store.transaction(self.db):
                store.write_settings(self.db, recorded)
                self._bump_generation()
            self._settings.update(recorded)
            recovery.write_mirror(self.path, self._settings)
            self._index = None
            self.neighbours.upkeep()

    def prepare(self, raw: np.ndarray) -> np.ndarray:
        """Raw descriptors → what the index holds (whitened when the collection has whitening)."""
        whitening = self.whitening
        return whitening.apply(raw) if whitening is not None else np.asarray(raw, dtype=np.float32)

    def index(self) -> ann.VectorIndex:
        """The faiss index of the current generation: loaded from disk when fresh and intact, else rebuilt
        from the descriptors (and saved when writable). A damaged index file is never used."""
        self.refresh_settings()
        key = self.index_stamp
        if self._index is not None and self._index_key == key:
            return self._index
        with self._storage():
            count = store.counts(self.db)["ok"]
        index = ann.load_saved(
            self.path / INDEX, self.path / INDEX_META, key, self.index_spec, self.index_dim(), count
        )
        if index is None:
            index = self.build_index()
            if not self.readonly:
                self.save_index(index)
        self._index, self._index_key = index, key
        return index

    @property
    def index_stamp(self) -> dict[str, object]:
        """What the index must have been built from: the database generation and the whitening."""
        return {
            "generation": int(self._settings.get("generation", 0)),
            "whitening": self._settings.get("whitening"),
        }

    @property
    def index_spec(self) -> ann.IndexSpec:
        """The index type and parameters this collection records (exact flat unless told otherwise)."""
        return ann.IndexSpec.from_record(self._settings.get("index", ann.IndexSpec().record()))

    def build_index(self) -> ann.VectorIndex:
        """A new index of every indexed image's (whitened) descriptor."""
        ids, raw = self.raw_vectors()
        xb = self.prepare(raw) if len(raw) else raw.reshape(0, self.index_dim())
        self.neighbours.offer(int(self._settings.get("generation", 0)), ids, xb)
        return ann.build_index(xb, ids, self.index_spec)

    def save_index(self, index: ann.VectorIndex) -> None:
        """Save ``index`` as the index of the current generation and whitening; a failure is logged, never
        raised (the index is rebuilt from the descriptors)."""
        try:
            ann.save_with_meta(index, self.path / INDEX, self.path / INDEX_META, self.index_stamp)
        except (OSError, CollectionError) as exc:
            log.warning("%s not saved (%s); it is rebuilt from the descriptors when next needed", INDEX, exc)

    def index_dim(self) -> int:
        """The dimension of what the index holds: the whitening's output, or the descriptors'."""
        whitening = self.whitening
        return whitening.dim if whitening is not None else self.dim

    def info(self) -> CollectionInfo:
        self.refresh_settings()
        with self._storage():
            numbers, version = store.counts(self.db), store.schema_version(self.db)
            local = store.local_feature_counts(self.db)
        disk = sum(p.stat().st_size for p in self.path.iterdir() if p.is_file())
        public = {k: v for k, v in self._settings.items() if k not in ("vector_rows", "generation")}
        return CollectionInfo(
            path=str(self.path),
            root=str(self.root) if self.root else None,
            schema_version=version,
            settings=public,
            images=numbers["ok"],
            failed=numbers["failed"],
            distinct_contents=numbers["contents"],
            whitening=self._settings.get("whitening"),  # type: ignore[arg-type]
            disk_bytes=disk,
            local_features={name: {"images": n, "bytes": size} for name, (n, size) in local.items()},
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
        if not folder.is_dir():
            raise CollectionError(f"{folder} is not a folder")
        if self.root is None:
            self._write_settings({"root": str(folder.resolve())})
        return self._synced(lambda syncer: syncer.sync(folder, progress, commit_every))

    def add(
        self,
        paths: Iterable[str | Path],
        progress: ProgressCallback | None = None,
        commit_every: int = DEFAULT_COMMIT_EVERY,
    ) -> SyncReport:
        """Index these files (new or changed ones)."""
        return self._synced(lambda syncer: syncer.add(paths, progress, commit_every))

    def _synced(self, run: Callable[[Syncer], SyncReport]) -> SyncReport:
        """``run`` a :class:`Syncer` under the write lock, then bring the index up to date. The network is
        built first, before the clock starts."""
        describer = self.extractor
        started = time.perf_counter()
        local = self.local_settings
        local_describer = local.describer() if local is not None else None
        with self.writing():
            try:
                report = run(Syncer(self.db, self.vectors, describer, self, local_describer))
            finally:
                self.refresh_settings()
            self.index()
            self.neighbours.upkeep()
        report.seconds = time.perf_counter() - started
        return report

    # -- the kNN table and DBA (diffusion, dba; see .neighbours) --------------------------------------------

    def set_augmentation(self, n: int | None, alpha: float = DEFAULT_ALPHA) -> None:
        """Apply DBA at index time: made now, kept current at every change and read by ``dba`` searches
        with these options (``n`` None: stop; searches then make it on first use)."""
        with self.writing():
            self._write_settings(augmentation_setting(n, alpha))
            self.neighbours.upkeep()

    def keep_neighbours(self, k: int | None = DEFAULT_K) -> None:
        """Keep the kNN table (``k`` neighbours per image) current at every change (None: stop)."""
        with self.writing():
            self._write_settings(neighbours_setting(k))
            self.neighbours.upkeep()

    def knn_table(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Image ids, and each one's ``k`` nearest other images and similarities (``GraphSource``)."""
        return self.neighbours.table(k).graph(k)

    def augmented(self, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Image ids and the DBA of their indexed vectors."""
        return self.neighbours.augmented(n, alpha)

    # -- local features (spatial verification) ---------------------------------------------------------

    @property
    def local_settings(self) -> LocalFeatureSettings | None:
        """The local features computed for every new image (``index --local-features``), if any."""
        return LocalFeatureSettings.from_record(self._settings.get(LOCAL_SETTING))

    def set_local_settings(self, settings: LocalFeatureSettings | None) -> None:
        """Compute these local features for every image indexed from now on (None: stop)."""
        with self.writing():
            self._write_settings({LOCAL_SETTING: settings.record() if settings else None})

    def local_features(self, ids: Sequence[int], describer: LocalDescriber) -> list[LocalFeatures | None]:
        """The local features of these images, stored or computed now (see :mod:`.local`)."""
        if self._local is None:
            self._local = StoredLocalFeatures(self.db, self.path / DATABASE, self, not self.readonly)
        return self._local.local_features(ids, describer)

    def searcher(self) -> Searcher:
        """A :class:`Searcher` of the current generation's index, describing queries with :attr:`describer`."""
        return Searcher(self.index(), self.describer, self)

    def search(
        self, query: Query, k: int = 30, bbox: BBox | None = None, rerank: str | Chain = "none"
    ) -> list[SearchHit]:
        """The ``k`` most similar indexed images to an image, a file, an image id or a raw descriptor,
        re-ranked by the chain ``rerank`` (text such as ``"dba,aqe"`` or a parsed :class:`Chain`; an
        indexed query never counts among its own neighbours, see :mod:`lookalike.rerank`)."""
        return self.searcher().search(query, k, bbox, rerank)

    def search_files(
        self, paths: Sequence[str | Path], k: int = 30, rerank: str | Chain = "none"
    ) -> list[FileHits]:
        """Hits for many query files at once, in order; an unreadable file comes back with its ``error``."""
        return self.searcher().search_files(paths, k, rerank)

    def search_vectors(
        self,
        raw: np.ndarray,
        k: int = 30,
        rerank: str | Chain = "none",
        pixels: Sequence[Image.Image | None] = (),
    ) -> list[list[SearchHit]]:
        """Hits for each raw descriptor row of ``raw`` (Q, D); ``pixels`` the image of each row, where
        known (spatial verification matches it)."""
        return self.searcher().search_vectors(raw, k, rerank, pixels)
