"""A training run's checkpoint on disk: ``checkpoint.safetensors`` (network and Adam tensors) and
``checkpoint.json`` (settings, epoch, schedule, random generators, history, and the tensors' sha256).
Nothing is pickled (docs/formats.md).

Crash safety, for this pair and for the published model's ``weights.safetensors`` + ``model.json``
(:func:`commit_pair`): the tensors are written in full to ``<stem>.next.safetensors`` and fsynced; the JSON
naming their sha256 then replaces the old one atomically — the commit point; last, the tensors are renamed
over the old ones. A crash before the commit point leaves the old pair intact (the ``.next`` file is
stale, and :func:`settle_pair` deletes it); a crash after it leaves a ``.next`` file whose hash the JSON
names, and :func:`settle_pair` finishes the rename. So reading a pair finds the tensors the JSON describes,
or a clear :class:`~lookalike.errors.CheckpointError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from lookalike.atomic import atomic_write, replace
from lookalike.errors import CheckpointError
from lookalike.train.loop import TrainerState
from lookalike.weights import sha256_file

CHECKPOINT_TENSORS: Final = "checkpoint.safetensors"
CHECKPOINT_JSON: Final = "checkpoint.json"
CHECKPOINT_FORMAT: Final = "lookalike-checkpoint"
CHECKPOINT_VERSION: Final = 1


def pending_name(tensors_name: str) -> str:
    """``weights.safetensors`` → ``weights.next.safetensors``: where new tensors wait for their JSON."""
    stem, _, suffix = tensors_name.rpartition(".")
    return f"{stem}.next.{suffix}"


def write_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """``tensors`` as a safetensors file at ``path``, complete and fsynced before it appears there."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        save_file(tensors, str(partial), metadata=metadata)
        descriptor = os.open(partial, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
        replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def commit_pair(
    folder: Path,
    tensors_name: str,
    json_name: str,
    tensors: dict[str, Tensor],
    metadata: dict[str, str],
    record: Callable[[str], dict[str, Any]],
) -> str:
    """Write ``tensors`` and the JSON ``record(sha256 of the tensors file)`` as a crash-safe pair (see the
    module docstring); the sha256."""
    folder.mkdir(parents=True, exist_ok=True)
    pending = folder / pending_name(tensors_name)
    write_safetensors(pending, tensors, metadata)
    sha256 = sha256_file(pending)
    with atomic_write(folder / json_name, "w") as handle:
        json.dump(record(sha256), handle, indent=1, allow_nan=False)
    replace(pending, folder / tensors_name)
    return sha256


def settle_pair(folder: Path, tensors_name: str, sha256: str) -> Path:
    """The tensors file whose hash is ``sha256`` (the JSON's), after finishing or discarding what a crash
    left (see the module docstring)."""
    final, pending = folder / tensors_name, folder / pending_name(tensors_name)
    if pending.exists():
        if sha256_file(pending) == sha256:
            replace(pending, final)
        else:
            pending.unlink()
    if not final.exists():
        raise CheckpointError(f"{final} is missing")
    if sha256_file(final) != sha256:
        raise CheckpointError(f"{final} does not have the sha256 its JSON names: it is damaged")
    return final


def save_checkpoint(folder: Path, state: TrainerState) -> str:
    """``state`` as ``folder``'s checkpoint pair, replacing the previous one crash-safely; the tensors'
    sha256."""

    def record(sha256: str) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "format_version": CHECKPOINT_VERSION,
            "tensors": {"file": CHECKPOINT_TENSORS, "sha256": sha256},
            **state.record,
        }

    metadata = {"format": CHECKPOINT_FORMAT, "epoch": str(state.record["epoch"])}
    return commit_pair(folder, CHECKPOINT_TENSORS, CHECKPOINT_JSON, state.tensors, metadata, record)


def load_checkpoint(folder: Path) -> TrainerState | None:
    """The checkpoint in ``folder``, None when there is none; :class:`CheckpointError` when damaged."""
    path = folder / CHECKPOINT_JSON
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record.get("format") != CHECKPOINT_FORMAT or record.get("format_version") != CHECKPOINT_VERSION:
            raise CheckpointError(f"{path}: not a lookalike checkpoint of format {CHECKPOINT_VERSION}")
        missing = sorted(
            {"tensors", "settings", "epoch", "optimizer", "scheduler", "rng", "history"} - set(record)
        )
        if missing:
            raise CheckpointError(f"{path}: damaged checkpoint, without {', '.join(missing)}")
        sha256 = record.pop("tensors")["sha256"]
        record.pop("format"), record.pop("format_version")
        tensors = load_file(str(settle_pair(folder, CHECKPOINT_TENSORS, sha256)))
    except (
        OSError,
        UnicodeDecodeError,
        ValueError,
        KeyError,
        TypeError,
        AttributeError,
        SafetensorError,
    ) as exc:
        raise CheckpointError(f"{path}: unreadable checkpoint ({exc})") from exc
    return TrainerState(tensors, record)


def discard_checkpoint(folder: Path) -> None:
    """Remove ``folder``'s checkpoint pair (and anything a crash left of it)."""
    for name in (CHECKPOINT_JSON, CHECKPOINT_TENSORS, pending_name(CHECKPOINT_TENSORS)):
        (folder / name).unlink(missing_ok=True)


__all__ = [
    "CHECKPOINT_JSON",
    "CHECKPOINT_TENSORS",
    "commit_pair",
    "discard_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "settle_pair",
    "write_safetensors",
]
