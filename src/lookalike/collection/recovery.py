"""What lets a collection whose database is lost or damaged be rebuilt without re-describing every image.

Two small files beside the database, each written before the database commits what they describe:

- ``settings.json``: the descriptor identity and root (what the database's settings hold, minus counters),
  rewritten atomically whenever one of them changes;
- ``rows.sha256``: the 32-byte sha256 of the content each descriptor row was made from, at ``row · 32``,
  written and fsynced with the rows themselves.

``check.rebuild_database`` moves the damaged database aside, creates a new one from ``settings.json``, takes back
every descriptor row whose content's sha256 is known and whose vector is intact, and indexes the root again:
files whose content has a row are matched by hash (no decoding), only the rest are described anew.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lookalike.atomic import atomic_write
from lookalike.collection.layout import SETTINGS_MIRROR
from lookalike.collection.vectors import write_records

MIRRORED_KEYS = (
    "model",
    "weights_sha256",
    "pooling",
    "gem_p",
    "imsize",
    "scales",
    "dim",
    "root",
    "whitening",
)
HASH_BYTES = 32


def write_mirror(path: Path, settings: dict[str, Any]) -> None:
    """Keep ``settings.json`` equal to the database's identity settings (atomically)."""
    mirrored = {key: settings.get(key) for key in MIRRORED_KEYS}
    try:
        if json.loads((path / SETTINGS_MIRROR).read_text()) == mirrored:
            return
    except (OSError, ValueError):
        pass
    with atomic_write(path / SETTINGS_MIRROR, "w") as handle:
        json.dump(mirrored, handle, indent=1)


def read_mirror(path: Path) -> dict[str, Any] | None:
    try:
        mirrored = json.loads((path / SETTINGS_MIRROR).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(mirrored, dict) or any(key not in mirrored for key in MIRRORED_KEYS):
        return None
    return mirrored


class RowHashes:
    """``rows.sha256``: the content hash of each descriptor row, fixed-size records like the vector file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, start_row: int, sha256s: list[str]) -> None:
        if sha256s:
            write_records(self.path, b"".join(bytes.fromhex(sha) for sha in sha256s), start_row * HASH_BYTES)

    def read(self) -> list[str]:
        try:
            data = self.path.read_bytes()
        except OSError:
            return []
        return [data[i : i + HASH_BYTES].hex() for i in range(0, len(data) - HASH_BYTES + 1, HASH_BYTES)]
