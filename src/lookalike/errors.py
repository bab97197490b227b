"""Typed errors raised by the library. The CLI decides how to show them; the library never prints or exits."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


class LookalikeError(Exception):
    """Base class of every error lookalike raises on purpose."""


class ImageError(LookalikeError):
    """An image file could not be turned into pixels. ``path`` names the file, ``reason`` says why."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


class UnsupportedImageError(ImageError):
    """The file is not an image in a format lookalike reads (text, zero bytes, unknown container)."""


class CorruptImageError(ImageError):
    """The file claims to be an image but its data is truncated or broken."""


class ImageTooLargeError(ImageError):
    """The image has more pixels than the configured limit (decompression-bomb guard)."""


class UnknownModelError(LookalikeError, KeyError):
    """No registry entry has this name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown model"


class WeightsError(LookalikeError):
    """Pretrained weights could not be obtained, verified or loaded."""


class WeightsNotAvailableError(WeightsError):
    """The weights are not cached and no source could deliver them (offline, missing tool)."""


class ChecksumError(WeightsError):
    """A downloaded or cached file does not have the sha256 the registry expects."""


class ConfigError(LookalikeError, ValueError):
    """An option or combination of options is invalid."""


class NoReferencesError(ConfigError):
    """Recognition has no labelled reference image to compare with."""


class WhiteningError(LookalikeError):
    """Whitening could not be fitted, applied or loaded (too few samples, shape mismatch, bad file)."""


class CollectionError(LookalikeError):
    """A collection is missing, damaged, locked by another writer, or used with other settings."""


class DamagedCollectionError(CollectionError):
    """A collection file is damaged on disk; ``lookalike check --repair`` says what can be rebuilt."""


class SettingsMismatchError(CollectionError):
    """Descriptors of different settings would be mixed in one collection."""


class CollectionBusyError(CollectionError):
    """Another process is writing to the collection."""


class DatasetError(LookalikeError):
    """A dataset or ground-truth file is missing, malformed, or refused (e.g. a pickle naming unsafe code)."""


class TrainingSetError(DatasetError):
    """A training set that cannot make tuples; ``classes`` names the classes at fault, if any."""

    def __init__(self, message: str, classes: Iterable[str] = ()) -> None:
        self.classes = tuple(classes)
        super().__init__(message)


class LocalModelError(WeightsError):
    """A model trained on this machine has a damaged or invalid folder (``model.json``, its weights file)."""


class CheckpointError(LookalikeError):
    """A training checkpoint is damaged, or was written with other settings than the run resuming it."""
