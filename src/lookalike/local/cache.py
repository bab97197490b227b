"""Local features of image files, computed on first ask and kept: in memory (bounded), and optionally in a
folder so a later run reads them instead of computing them again.

:class:`FileLocalFeatures` is the :class:`lookalike.rerank.LocalFeatureSource` of anything that knows
its images by file (evaluation, a read-only collection). A file that cannot be read gives None, never an
error: spatial verification then leaves that candidate's score as it was.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path

from lookalike import atomic
from lookalike.errors import ImageError
from lookalike.images import load_image
from lookalike.local.features import LocalDescriber, LocalFeatures

log = logging.getLogger(__name__)

DEFAULT_KEEP = 2048  # images whose features stay in memory (about 0.15 MB each at 1,024 XFeat keypoints)


def describe_file(path: Path, describer: LocalDescriber) -> LocalFeatures | None:
    """``describer``'s features of the image file ``path``; None (logged) when it cannot be read."""
    try:
        return describer.describe(load_image(path))
    except ImageError as exc:
        log.warning("local features of %s: %s", path, exc.reason)
        return None


class MemoryCache:
    """The last ``keep`` features asked for, by (describer identity, key); safe across threads."""

    def __init__(self, keep: int = DEFAULT_KEEP) -> None:
        self.keep = keep
        self._items: OrderedDict[tuple[str, object], LocalFeatures] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, identity: str, key: object) -> LocalFeatures | None:
        with self._lock:
            found = self._items.get((identity, key))
            if found is not None:
                self._items.move_to_end((identity, key))
            return found

    def put(self, identity: str, key: object, features: LocalFeatures) -> None:
        with self._lock:
            self._items[(identity, key)] = features
            self._items.move_to_end((identity, key))
            while len(self._items) > self.keep:
                self._items.popitem(last=False)


class FileLocalFeatures:
    """Local features of the images ``path_of(id)`` names; ``folder`` (optional) keeps them across runs,
    one file per image and describer identity, keyed by the image's path, size and mtime."""

    def __init__(
        self, path_of: Callable[[int], Path | None], folder: Path | None = None, keep: int = DEFAULT_KEEP
    ) -> None:
        self.path_of = path_of
        self.folder = folder
        self.memory = MemoryCache(keep)

    def local_features(self, ids: Sequence[int], describer: LocalDescriber) -> list[LocalFeatures | None]:
        return [self._one(int(i), describer) for i in ids]

    def _one(self, image_id: int, describer: LocalDescriber) -> LocalFeatures | None:
        found = self.memory.get(describer.identity, image_id)
        if found is not None:
            return found
        path = self.path_of(image_id)
        if path is None:
            return None
        stored = self._stored(path, describer)
        features = stored if stored is not None else describe_file(path, describer)
        if features is not None:
            self.memory.put(describer.identity, image_id, features)
            if stored is None:
                self._store(path, describer, features)
        return features

    def _file(self, path: Path, describer: LocalDescriber) -> Path | None:
        if self.folder is None:
            return None
        try:
            stat = path.stat()
        except OSError:
            return None
        key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}|{describer.identity}"
        digest = hashlib.sha256(key.encode()).hexdigest()
        return self.folder / digest[:2] / f"{digest}.lf"

    def _stored(self, path: Path, describer: LocalDescriber) -> LocalFeatures | None:
        file = self._file(path, describer)
        if file is None or not file.exists():
            return None
        try:
            return LocalFeatures.from_bytes(file.read_bytes())
        except (OSError, ValueError) as exc:
            log.warning("cached local features %s unreadable (%s); computing them again", file, exc)
            return None

    def _store(self, path: Path, describer: LocalDescriber, features: LocalFeatures) -> None:
        file = self._file(path, describer)
        if file is None:
            return
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            with atomic.atomic_write(file) as out:
                out.write(features.to_bytes())
        except OSError as exc:
            log.warning("could not keep local features in %s: %s", file, exc)
