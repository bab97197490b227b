"""A collection's kNN table — each indexed image's K nearest other indexed images — and the database-side
augmentation (DBA) made from it, kept beside the descriptors so that ``--rerank diffusion`` reads the graph
and ``--rerank dba`` the augmented vectors instead of searching the whole database against itself.

**The table** (``neighbours.npz``): for each indexed image id (ascending), the ids of its ``K`` nearest
*other* images by inner product of the indexed (whitened) vectors, best first, and their similarities;
``-1`` / ``-inf`` pad a row when the collection holds K or fewer others. A duplicate of an image is its
neighbour; the image itself never is. Lists come from batched searches of the collection's vector index
(:func:`lookalike.collection.ann.search`): exact with the flat index, as good as the index otherwise.
``K`` is diffusion's default ``k`` (50) unless recorded larger; a stage asking for more gets a table made
with its ``k``.

**DBA** (``dba.npz``): each indexed vector plus its first ``n`` listed neighbours weighted by
``max(s, 0)^α``, normalised — :func:`lookalike.rerank.expand_with` on the table's first ``n`` columns, which
is what :class:`~lookalike.rerank.DatabaseSideAugmentation` computes over the whole database (up to the
order of equal similarities): N · n · D multiply-adds once the table is there.

**Stamps.** Each file records what it was made from: the *basis* (the whitening's kind and the sha256 of
its file, which ``set_whitening`` records in the same transaction as its generation; the index type and
parameters), the *entries* (every image id with its descriptor row and that row's crc32, as the database
records them) and the generation; the DBA file also its ``n`` and ``alpha``. A file whose basis or entries
differ from the collection's is stale and never used as it is: a changed file, a removed and re-added
image, a repaired descriptor row and a rebuilt database all show in the entries.

**Upkeep.** A collection that keeps the table (a recorded ``neighbours`` or ``dba`` setting:
``Collection.keep_neighbours``, ``Collection.set_augmentation``) brings it up to date at the end of every
sync, add, remove and whitening change, under the write lock — and with ``dba`` recorded the augmented
vectors too — so searches pay neither. A stale table of the same basis is *updated* (:func:`update_table`);
a changed basis, or a change too large for an update to be cheaper, rebuilds it. A collection that keeps
no table, or one open read-only whose table is stale, makes what a search asks for in memory on first use
(and says so in the log), saving it when the collection is writable.

**Crash safety.** Both files are replaced atomically (:func:`lookalike.atomic.save_npz_atomic`), only after
the database committed what they describe: a kill at any point leaves a file that is current, or one whose
stamp shows it stale — never a wrong file taken for current. Arrays only (``allow_pickle=False``).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Any, Final, Protocol

import numpy as np

from lookalike.atomic import file_sha256, file_stamp, save_npz_atomic
from lookalike.collection import ann, store
from lookalike.collection.layout import AUGMENTED, DATABASE, NEIGHBOURS, WHITENING
from lookalike.errors import CollectionError, ConfigError
from lookalike.rerank.diffusion import DEFAULT_K, MAX_K
from lookalike.rerank.expansion import DEFAULT_ALPHA, DEFAULT_N, DatabaseSideAugmentation, expand_with

log = logging.getLogger(__name__)

NEIGHBOURS_SETTING: Final = "neighbours"  # {"k": K}: keep the kNN table
DBA_SETTING: Final = "dba"  # {"n": n, "alpha": alpha}: keep DBA (and so the table)
FORMAT: Final = 1
BATCH: Final = 2048  # query rows per index search and per similarity block
_BLOCK_FLOATS: Final = 1 << 22  # bounds the (rows, n, D) neighbour block of augment()


@dataclass(frozen=True)
class Augmentation:
    """An index-time DBA setting: every indexed vector plus its ``n`` nearest others weighted by
    similarity^α (the options of the ``dba`` stage, checked as it checks them)."""

    n: int = DEFAULT_N
    alpha: float = DEFAULT_ALPHA

    def __post_init__(self) -> None:
        DatabaseSideAugmentation(self.n, self.alpha)  # ConfigError for options the stage refuses
        object.__setattr__(self, "alpha", float(self.alpha))

    def record(self) -> dict[str, Any]:
        return {"n": self.n, "alpha": self.alpha}

    @classmethod
    def from_record(cls, record: object) -> Augmentation | None:
        if not record:
            return None
        if not isinstance(record, dict) or "n" not in record or "alpha" not in record:
            raise CollectionError(f"the recorded {DBA_SETTING} setting {record!r} is not readable")
        return cls(record["n"], record["alpha"])


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise ConfigError(f"a kNN table needs k from 1 to {MAX_K} neighbours, got {k!r}")
    return k


def neighbours_setting(k: int | None) -> dict[str, Any]:
    """The collection setting that keeps the kNN table with ``k`` neighbours per image (None: stops)."""
    return {NEIGHBOURS_SETTING: None if k is None else {"k": check_k(k)}}


def augmentation_setting(n: int | None, alpha: float = DEFAULT_ALPHA) -> dict[str, Any]:
    """The collection setting that keeps DBA with these options at index time (``n`` None: stops)."""
    return {DBA_SETTING: None if n is None else Augmentation(n, alpha).record()}


@dataclass(frozen=True)
class Entries:
    """The indexed images as the database records them: ``ids`` ascending, each one's descriptor ``rows``
    and that row's ``crcs`` (−1: none recorded), and the ``generation`` they were read at."""

    ids: np.ndarray
    rows: np.ndarray
    crcs: np.ndarray
    generation: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    def same(self, other: Entries) -> bool:
        """The same images with the same descriptors (the generation may differ)."""
        return all(
            np.array_equal(mine, theirs)
            for mine, theirs in ((self.ids, other.ids), (self.rows, other.rows), (self.crcs, other.crcs))
        )

    def arrays(self) -> dict[str, np.ndarray]:
        return {
            "ids": self.ids,
            "rows": self.rows,
            "crcs": self.crcs,
            "generation": np.array(self.generation, np.int64),
        }

    @classmethod
    def from_arrays(cls, data: Any) -> Entries:
        ids, rows, crcs = (np.asarray(data[name], np.int64) for name in ("ids", "rows", "crcs"))
        if ids.ndim != 1 or rows.shape != ids.shape or crcs.shape != ids.shape:
            raise ValueError("entries of different lengths")
        return cls(ids, rows, crcs, int(data["generation"]))


@dataclass(frozen=True)
class KnnTable:
    """Each entry's ``neighbours`` ``(N, K)`` int64 ids (``-1`` padding) and ``similarities`` ``(N, K)``
    float32 (``-inf`` there), best first, made on ``basis`` (see the module docstring)."""

    entries: Entries
    neighbours: np.ndarray
    similarities: np.ndarray
    basis: str

    @property
    def k(self) -> int:
        return int(self.neighbours.shape[1])

    def graph(self, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As :func:`lookalike.rerank.knn_graph` returns it: ids, the first ``k`` neighbours, their
        similarities."""
        return self.entries.ids, self.neighbours[:, :k], self.similarities[:, :k]


@dataclass(frozen=True)
class AugmentedVectors:
    """The DBA of ``entries``' indexed vectors (rows in the order of their ids) by ``setting``, on ``basis``."""

    entries: Entries
    vectors: np.ndarray
    setting: Augmentation
    basis: str


# -- the maths ----------------------------------------------------------------------------------------------


def nearest_others(
    index: ann.VectorIndex, xq: np.ndarray, own: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's ``k`` nearest entries of ``index`` other than its own id ``own``: ids ``(Q, k)``
    (``-1`` where the index has fewer) and similarities (``-inf`` there), by batched searches."""
    neighbours = np.full((len(xq), k), -1, np.int64)
    similarities = np.full((len(xq), k), -np.inf, np.float32)
    if index.ntotal == 0:
        return neighbours, similarities
    for start in range(0, len(xq), BATCH):
        stop = start + BATCH
        scores, found = ann.search(index, xq[start:stop], k + 1)
        keep = (found >= 0) & (found != own[start:stop, None])
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # others first, in rank order
        kept = np.take_along_axis(keep, order, axis=1)
        width = order.shape[1]
        neighbours[start:stop, :width] = np.where(kept, np.take_along_axis(found, order, axis=1), -1)
        similarities[start:stop, :width] = np.where(kept, np.take_along_axis(scores, order, axis=1), -np.inf)
    return neighbours, similarities


def build_table(index: ann.VectorIndex, entries: Entries, xb: np.ndarray, k: int, basis: str) -> KnnTable:
    """The table of ``entries`` (vectors ``xb``, held by ``index`` under their ids), made afresh."""
    neighbours, similarities = nearest_others(index, xb, entries.ids, k)
    return KnnTable(entries, neighbours, similarities, basis)


def update_table(
    table: KnnTable,
    entries: Entries,
    index: ann.VectorIndex,
    vectors: Callable[[np.ndarray], np.ndarray],
) -> KnnTable | None:
    """``table`` brought up to ``entries`` (what ``index`` now holds), or None when a rebuild is cheaper.
    ``vectors(positions)`` gives the indexed vectors of the entries at these positions.

    An entry is *kept* when the table has its id with the same descriptor row and crc32; any other entry is
    *new* (added, or its descriptor changed). A kept entry that listed an id not kept (removed or changed)
    is *recomputed*. New and recomputed entries get their lists from a search of ``index``, which holds the
    new images; every other kept entry gets each new image whose similarity beats its K-th inserted into
    its list (exact products with the new vectors; on equal similarity the listed entry stays first).
    A search or an insertion costs N · D per entry, a rebuild N · D per entry of the collection: so None
    when twice the new plus the recomputed entries exceed half of the collection."""
    old, k, count = table.entries, table.k, len(entries)
    at = np.minimum(np.searchsorted(old.ids, entries.ids), max(len(old) - 1, 0))
    known = np.zeros(count, bool)
    if len(old):
        known = (old.ids[at] == entries.ids) & (old.rows[at] == entries.rows) & (old.crcs[at] == entries.crcs)
    kept, new = np.flatnonzero(known), np.flatnonzero(~known)
    neighbours = np.full((count, k), -1, np.int64)
    similarities = np.full((count, k), -np.inf, np.float32)
    neighbours[kept], similarities[kept] = table.neighbours[at[kept]], table.similarities[at[kept]]
    lost = np.setdiff1d(old.ids, entries.ids[kept])
    listed_lost = np.isin(neighbours[kept], lost).any(axis=1)
    again, clean = kept[listed_lost], kept[~listed_lost]
    if 2 * len(new) + len(again) > count // 2:
        return None
    searched = np.concatenate([new, again])
    clean_vectors = vectors(clean) if len(new) and len(clean) else None  # first: a large share reads all
    if len(searched):
        xq, own = vectors(searched), entries.ids[searched]
        if clean_vectors is not None:
            insert(neighbours, similarities, clean, clean_vectors, xq[: len(new)], own[: len(new)])
        neighbours[searched], similarities[searched] = nearest_others(index, xq, own, k)
    return KnnTable(entries, neighbours, similarities, table.basis)


def insert(
    neighbours: np.ndarray,
    similarities: np.ndarray,
    rows: np.ndarray,
    xb: np.ndarray,
    xn: np.ndarray,
    ids: np.ndarray,
) -> None:
    """In place: into the lists at ``rows`` (their vectors ``xb``), each new image (vectors ``xn``, ``ids``)
    whose similarity beats the list's K-th, the lists kept best first and K long."""
    k = neighbours.shape[1]
    for start in range(0, len(rows), BATCH):
        block, sims = rows[start : start + BATCH], xb[start : start + BATCH] @ xn.T
        hit = (sims > similarities[block, -1][:, None]).any(axis=1)
        if not hit.any():
            continue
        block, sims = block[hit], sims[hit]
        merged_sims = np.concatenate([similarities[block], sims], axis=1)
        merged_ids = np.concatenate([neighbours[block], np.broadcast_to(ids, sims.shape)], axis=1)
        order = np.argsort(-merged_sims, axis=1, kind="stable")[:, :k]
        neighbours[block] = np.take_along_axis(merged_ids, order, axis=1)
        similarities[block] = np.take_along_axis(merged_sims, order, axis=1)


def augment(table: KnnTable, xb: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """DBA from the table: row ``i`` of ``xb`` (the vector of ``table.entries.ids[i]``) plus its first ``n``
    listed neighbours weighted by ``max(s, 0)^α``, normalised (:func:`lookalike.rerank.expand_with`)."""
    ids = table.entries.ids
    listed, sims = table.neighbours[:, :n], table.similarities[:, :n]
    positions = np.minimum(np.searchsorted(ids, listed), max(len(ids) - 1, 0))
    out = np.empty_like(xb)
    step = max(1, _BLOCK_FLOATS // max(1, listed.shape[1] * xb.shape[1]))
    for start in range(0, len(xb), step):
        block = slice(start, start + step)
        present = listed[block] >= 0
        others = np.where(present[..., None], xb[positions[block]], 0.0)
        out[block] = expand_with(xb[block], others, np.where(present, sims[block], -np.inf), alpha)
    return out


# -- the files ----------------------------------------------------------------------------------------------


def _save(path: Path, basis: str, entries: Entries, **arrays: np.ndarray) -> None:
    """A derived file: its format, what it was made from (``basis``, ``entries``) and its ``arrays``."""
    save_npz_atomic(path, format=np.array(FORMAT), basis=np.array(basis), **arrays, **entries.arrays())


def save_table(path: Path, table: KnnTable) -> None:
    _save(path, table.basis, table.entries, neighbours=table.neighbours, similarities=table.similarities)


def load_table(path: Path) -> KnnTable | None:
    """The table saved at ``path``; None when there is none, or (with a warning) when it is unreadable."""

    def read(data: Any) -> KnnTable:
        table = KnnTable(
            Entries.from_arrays(data),
            np.asarray(data["neighbours"], np.int64),
            np.asarray(data["similarities"], np.float32),
            str(data["basis"]),
        )
        if table.neighbours.shape != table.similarities.shape or len(table.neighbours) != len(table.entries):
            raise ValueError("the neighbour lists do not fit the entries")
        return table

    return _load(path, read)


def save_augmented(path: Path, found: AugmentedVectors) -> None:
    n, alpha = np.array(found.setting.n, np.int64), np.array(found.setting.alpha, np.float64)
    _save(path, found.basis, found.entries, n=n, alpha=alpha, vectors=found.vectors)


def load_augmented(path: Path) -> AugmentedVectors | None:
    """The augmented vectors saved at ``path``; None when there are none or they are unreadable."""

    def read(data: Any) -> AugmentedVectors:
        found = AugmentedVectors(
            Entries.from_arrays(data),
            np.asarray(data["vectors"], np.float32),
            Augmentation(int(data["n"]), float(data["alpha"])),
            str(data["basis"]),
        )
        if found.vectors.ndim != 2 or len(found.vectors) != len(found.entries):
            raise ValueError("the vectors do not fit the entries")
        return found

    return _load(path, read)


def _load(path: Path, read: Callable[[Any], Any]) -> Any:
    try:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != FORMAT:
                log.info("%s has format %s, not %d; it is made again", path, data["format"], FORMAT)
                return None
            return read(data)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, ConfigError) as exc:
        log.warning("%s is unreadable (%s); it is made again", path, exc)
        return None


# -- kept with a collection ---------------------------------------------------------------------------------


class Indexed(Protocol):
    """What the table needs of a collection: its settings, its index, and its indexed vectors."""

    readonly: bool

    @property
    def settings(self) -> dict[str, Any]: ...

    def refresh_settings(self) -> None: ...

    def index(self) -> ann.VectorIndex: ...

    def verified_rows(self, rows: np.ndarray) -> np.ndarray: ...

    def prepare(self, raw: np.ndarray) -> np.ndarray: ...


class StoredNeighbours:
    """The kNN table and DBA of the collection at ``folder`` (database ``db``), kept current as the module
    docstring says: in memory for as long as the collection's generation stays, on disk when writable."""

    def __init__(self, db: sqlite3.Connection, folder: Path, collection: Indexed) -> None:
        self.db = db
        self.folder = folder
        self.collection = collection
        self._table: KnnTable | None = None
        self._augmented: AugmentedVectors | None = None
        self._whitening_digest: tuple[tuple[int, int, int], str] | None = None
        self.offered: tuple[int, np.ndarray, np.ndarray] | None = None

    @property
    def writable(self) -> bool:
        return not self.collection.readonly

    def kept_k(self) -> int | None:
        """The K the collection keeps its table with at every change (None: it keeps none)."""
        settings = self.collection.settings
        wanted = [int((settings.get(NEIGHBOURS_SETTING) or {}).get("k", 0))]
        if (setting := Augmentation.from_record(settings.get(DBA_SETTING))) is not None:
            wanted.append(max(DEFAULT_K, setting.n))
        return max(wanted) or None

    def upkeep(self) -> None:
        """After a change, under the write lock: the kept table (and the recorded DBA) made current and saved."""
        k = self.kept_k()
        try:
            if k is None:
                return
            reading = _Reading(self)
            self._current_table(k, reading)
            setting = Augmentation.from_record(self.collection.settings.get(DBA_SETTING))
            if setting is not None:
                self._current_augmented(setting, reading)
        finally:
            self.offered = None

    def offer(self, generation: int, ids: np.ndarray, xb: np.ndarray) -> None:
        """The indexed vectors of every image (ids ascending) that the collection just read to build its
        index, for the kept table's next update to use instead of reading them again (held until then)."""
        self.offered = (generation, ids, xb) if self.writable and self.kept_k() is not None else None

    def table(self, k: int = DEFAULT_K) -> KnnTable:
        """The current table, with at least ``k`` neighbours per entry."""
        return self._current_table(check_k(k), _Reading(self))

    def augmented(self, n: int, alpha: float) -> tuple[np.ndarray, np.ndarray]:
        """Image ids ``(N,)`` and the current DBA ``(N, D)`` of their indexed vectors."""
        found = self._current_augmented(Augmentation(n, alpha), _Reading(self))
        return found.entries.ids, found.vectors

    def entries(self) -> Entries:
        with store.storage_errors(self.folder / DATABASE):
            found, generation = store.indexed_keys(self.db)
        columns = np.array([(i, row, -1 if crc is None else crc) for i, row, crc in found], np.int64)
        columns = columns.reshape(-1, 3)
        return Entries(columns[:, 0].copy(), columns[:, 1].copy(), columns[:, 2].copy(), int(generation))

    # -- the table and the augmented vectors, current -----------------------------------------------------

    def _current_table(self, k: int, reading: _Reading) -> KnnTable:
        k = max(k, self.kept_k() or DEFAULT_K)
        held = self._table if self._table is not None and self._table.basis == reading.basis else None
        if held is not None and held.entries.generation == reading.generation and held.k >= k:
            return held
        entries, _ = reading.snapshot  # the basis too may have moved on
        held = self._table if self._table is not None and self._table.basis == reading.basis else None
        old = held if held is not None else self._stored_table(reading.basis)
        if old is not None and old.k >= k and old.entries.same(entries):
            table = replace(old, entries=entries)  # current: only the generation moved on
        else:
            why = "none is stored"
            if old is not None:
                why = "the stored one is stale" if old.k >= k else f"the stored one has K={old.k}"
            table = self._made(old if old is not None and old.k >= k else None, k, reading, why)
        self._table = table
        return table

    def _made(self, old: KnnTable | None, k: int, reading: _Reading, why: str) -> KnnTable:
        entries, index = reading.snapshot
        started = time.perf_counter()
        table = update_table(old, entries, index, reading.vectors) if old is not None else None
        how = "updated" if table is not None else "built"
        if table is None:
            table = build_table(index, entries, reading.vectors(), k, reading.basis)
        seconds = time.perf_counter() - started
        if self.writable:
            self._save(NEIGHBOURS, lambda path: save_table(path, table))
            log.info(
                "%s: kNN table of %d images %s (K=%d, %.2f s)", self.folder, len(entries), how, k, seconds
            )
        else:
            kept = self.kept_k() is not None  # then a sync should have left it current: worth a warning
            log.log(
                logging.WARNING if kept else logging.INFO,
                "%s: kNN table of %d images %s in memory (K=%d, %.2f s): %s and the collection is read-only",
                self.folder, len(entries), how, k, seconds, why,
            )  # fmt: skip
        return table

    def _current_augmented(self, setting: Augmentation, reading: _Reading) -> AugmentedVectors:
        held = self._held_augmented(setting, reading.basis)
        if held is not None and held.entries.generation == reading.generation:
            return held
        entries, _ = reading.snapshot  # the basis too may have moved on
        held = self._held_augmented(setting, reading.basis)
        found = held if held is not None else self._stored_augmented(setting, reading.basis)
        if found is not None and found.entries.same(entries):
            found = replace(found, entries=entries)
        else:
            table = self._current_table(setting.n, reading)
            vectors = augment(table, reading.vectors(), setting.n, setting.alpha)
            found = AugmentedVectors(table.entries, vectors, setting, reading.basis)
            recorded = Augmentation.from_record(self.collection.settings.get(DBA_SETTING))
            if self.writable and recorded in (None, setting):
                made = found
                self._save(AUGMENTED, lambda path: save_augmented(path, made))
        self._augmented = found
        return found

    def _held_augmented(self, setting: Augmentation, basis: str) -> AugmentedVectors | None:
        held = self._augmented
        return held if held is not None and (held.setting, held.basis) == (setting, basis) else None

    def _stored_table(self, basis: str) -> KnnTable | None:
        table = load_table(self.folder / NEIGHBOURS)
        return table if table is not None and table.basis == basis else None

    def _stored_augmented(self, setting: Augmentation, basis: str) -> AugmentedVectors | None:
        found = load_augmented(self.folder / AUGMENTED)
        return found if found is not None and (found.setting, found.basis) == (setting, basis) else None

    def _save(self, name: str, save: Callable[[Path], None]) -> None:
        try:
            save(self.folder / name)
        except OSError as exc:
            log.warning("%s not saved (%s); it is made again when next needed", name, exc.strerror or exc)

    def basis(self) -> str:
        """What the indexed vectors and the lists depend on beyond the entries: the whitening (its kind and
        the sha256 its file had when it was set, recorded with the generation that set it, so a file
        replaced before that commit is no basis yet) and the index type."""
        settings = self.collection.settings
        kind = settings.get("whitening")
        digest = settings.get("whitening_sha256") if kind is not None else None
        if kind is not None and digest is None:  # set by a lookalike that did not record it
            digest = self._digest(self.folder / WHITENING)
        basis = {"whitening": kind, "whitening_sha256": digest, "index": settings.get("index")}
        return json.dumps(basis, sort_keys=True)

    def _digest(self, path: Path) -> str | None:
        stamp = file_stamp(path)
        if stamp is None:
            return None
        if self._whitening_digest is None or self._whitening_digest[0] != stamp:
            self._whitening_digest = (stamp, file_sha256(path))
        return self._whitening_digest[1]


class _Reading:
    """One request's look at the collection: its settings (read first), its entries and index (read
    together on first need) and its indexed vectors (all of them read at most once)."""

    def __init__(self, owner: StoredNeighbours) -> None:
        self.owner = owner
        owner.collection.refresh_settings()
        self.generation = int(owner.collection.settings.get("generation", 0))
        self.basis = owner.basis()
        self._all: np.ndarray | None = None

    @cached_property
    def snapshot(self) -> tuple[Entries, ann.VectorIndex]:
        """The entries and an index of the same generation (read again when a writer committed between)."""
        for _ in range(3):
            entries = self.owner.entries()
            index = self.owner.collection.index()
            if int(self.owner.collection.settings.get("generation", 0)) == entries.generation:
                if index.ntotal != len(entries):
                    raise CollectionError(
                        f"{self.owner.folder}: the index holds {index.ntotal} vectors, the database "
                        f"{len(entries)}; run `lookalike check -c {self.owner.folder} --repair`"
                    )
                if entries.generation != self.generation:  # a writer committed since the settings were read
                    self.generation, self.basis = entries.generation, self.owner.basis()
                return entries, index
        raise CollectionError(f"{self.owner.folder} kept changing while it was read; try again")

    def vectors(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The indexed vectors of the entries at ``positions`` (all: None), in that order."""
        entries, index = self.snapshot
        offered, self.owner.offered = self.owner.offered, None
        if self._all is None and offered is not None and offered[0] == entries.generation:
            self._all = offered[2] if np.array_equal(offered[1], entries.ids) else None  # same rows
        if self._all is None and (positions is None or 2 * len(positions) > len(entries)):
            self._all = self._prepared(entries.rows, index.d)
        if self._all is not None:
            return self._all if positions is None else self._all[positions]
        return self._prepared(entries.rows[positions], index.d)

    def _prepared(self, rows: np.ndarray, dim: int) -> np.ndarray:
        if len(rows) == 0:
            return np.zeros((0, dim), np.float32)
        collection = self.owner.collection
        return np.ascontiguousarray(collection.prepare(collection.verified_rows(rows)), np.float32)
