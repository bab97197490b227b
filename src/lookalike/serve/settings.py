"""What a server allows: upload size, pixels, how many results, thumbnail size, how many queued searches."""

from __future__ import annotations

from dataclasses import dataclass

from lookalike.errors import ConfigError
from lookalike.images import DEFAULT_MAX_PIXELS

MEGABYTE = 1024 * 1024


@dataclass(frozen=True)
class ServeSettings:
    max_upload_bytes: int = 20 * MEGABYTE
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    default_k: int = 30
    max_k: int = 100
    thumb_size: int = 256
    decode_threads: int = 2
    max_waiting: int = 64  # searches waiting for the model; past this a search gets 503 and retries later

    def __post_init__(self) -> None:
        if self.max_upload_bytes < 1:
            raise ConfigError(f"the upload limit must be positive, got {self.max_upload_bytes} bytes")
        if self.max_pixels is not None and self.max_pixels < 1:
            raise ConfigError(f"max_pixels must be positive or None, got {self.max_pixels}")
        if not 1 <= self.default_k <= self.max_k:
            raise ConfigError(f"need 1 ≤ default_k ≤ max_k, got {self.default_k} and {self.max_k}")
        if self.thumb_size < 16:
            raise ConfigError(f"thumbnails must be at least 16 px, got {self.thumb_size}")
        if self.decode_threads < 1 or self.max_waiting < 1:
            raise ConfigError("decode_threads and max_waiting must be positive")
