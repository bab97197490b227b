"""A collection's local features (spatial verification): stored per content in the database when the
collection computes them at index time (``index --local-features``), otherwise computed from the image
file on first ask, kept in memory, and stored too when the collection is open for writing.

Features of a content are keyed by the describer's identity, so features of other bounds or weights are
never mixed with the ones asked for. A file changed since it was indexed, or gone, gives None: spatial
verification then leaves that candidate's score as it was.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from lookalike.collection import store
from lookalike.collection.store import ImageRecord
from lookalike.errors import ConfigError
from lookalike.local import (
    AUTO,
    DEFAULT_MAX_KEYPOINTS,
    DEFAULT_MAX_SIZE,
    LOCAL_FEATURES,
    check_local_features,
    local_describer,
)
from lookalike.local.cache import MemoryCache, describe_file
from lookalike.local.features import LocalDescriber, LocalFeatures

log = logging.getLogger(__name__)

SETTING = "local_features"


@dataclass(frozen=True)
class LocalFeatureSettings:
    """What ``index --local-features`` asks the collection to compute for every new image."""

    features: str
    keypoints: int = DEFAULT_MAX_KEYPOINTS
    size: int = DEFAULT_MAX_SIZE

    def __post_init__(self) -> None:
        if str(self.features).lower() == AUTO:
            raise ConfigError(f"local features are one of {', '.join(LOCAL_FEATURES)}, got {self.features!r}")
        name = check_local_features(self.features, self.keypoints, self.size, "--local-features")
        object.__setattr__(self, "features", name)

    def describer(self) -> LocalDescriber:
        return local_describer(self.features, self.keypoints, self.size)

    def record(self) -> dict[str, Any]:
        return {"features": self.features, "keypoints": self.keypoints, "size": self.size}

    @classmethod
    def from_record(cls, record: dict[str, Any] | None) -> LocalFeatureSettings | None:
        return None if not record else cls(record["features"], record["keypoints"], record["size"])


class Records(Protocol):
    def records(self, ids: list[int]) -> dict[int, ImageRecord]: ...

    def absolute_path(self, name: str) -> Path: ...


class StoredLocalFeatures:
    """The :class:`lookalike.rerank.LocalFeatureSource` of a collection: ``db`` holds stored features,
    ``images`` names the files; ``writable`` says whether features computed on demand are stored."""

    def __init__(self, db: sqlite3.Connection, database: Path, images: Records, writable: bool) -> None:
        self.db = db
        self.database = database
        self.images = images
        self.writable = writable
        self.memory = MemoryCache()

    def local_features(self, ids: Sequence[int], describer: LocalDescriber) -> list[LocalFeatures | None]:
        records = self.images.records([int(i) for i in ids])
        wanted = {r.sha256: r for r in records.values() if r.sha256 is not None and r.row is not None}
        found = {sha: f for sha in wanted if (f := self.memory.get(describer.identity, sha)) is not None}
        missing = [sha for sha in wanted if sha not in found]
        if missing:
            with store.storage_errors(self.database):
                stored = store.local_features_of(self.db, missing, describer.identity)
            found.update(self._decoded(stored))
            computed = self._computed([wanted[s] for s in missing if s not in found], describer)
            found.update(computed)
            self._keep(describer, computed)
            for sha in missing:
                if sha in found:
                    self.memory.put(describer.identity, sha, found[sha])
        by_id = {image_id: found.get(record.sha256 or "") for image_id, record in records.items()}
        return [by_id.get(int(i)) for i in ids]

    def _decoded(self, stored: dict[str, bytes]) -> dict[str, LocalFeatures]:
        decoded = {}
        for sha, data in stored.items():
            try:
                decoded[sha] = LocalFeatures.from_bytes(data)
            except ValueError as exc:
                log.warning(
                    "stored local features of %s unreadable (%s); computing them again", sha[:12], exc
                )
        return decoded

    def _computed(self, records: list[ImageRecord], describer: LocalDescriber) -> dict[str, LocalFeatures]:
        computed = {}
        for record in records:
            path = self.images.absolute_path(record.path)
            if not _unchanged(path, record):
                continue
            features = describe_file(path, describer)
            if features is not None and record.sha256 is not None:
                computed[record.sha256] = features
        return computed

    def _keep(self, describer: LocalDescriber, computed: dict[str, LocalFeatures]) -> None:
        if not computed or not self.writable:
            return
        data = {sha: features.to_bytes() for sha, features in computed.items()}
        try:
            with store.transaction(self.db):
                store.add_local_features(self.db, describer.identity, data)
        except sqlite3.OperationalError as exc:  # busy or read-only: they stay in memory
            log.info("local features computed for %d images kept in memory only (%s)", len(data), exc)


def _unchanged(path: Path, record: ImageRecord) -> bool:
    try:
        stat = path.stat()
    except OSError:
        return False
    return (stat.st_size, stat.st_mtime_ns) == (record.size, record.mtime_ns)
