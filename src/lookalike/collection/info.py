"""What a collection says about itself: its summary (:class:`CollectionInfo`) and why it refuses settings
that are not its own."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IDENTITY_KEYS = ("model", "weights_sha256", "pooling", "gem_p", "imsize", "scales", "dim")


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
    # per describer identity: {"images": how many contents have them stored, "bytes": their size}
    local_features: dict[str, dict[str, int]] | None = None


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
