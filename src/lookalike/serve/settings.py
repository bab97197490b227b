"""What a server allows: upload size, pixels, how many results, thumbnail size, how many queued searches,
how long a request body may take, which Host names it answers to and the access token it asks for."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from lookalike.errors import ConfigError
from lookalike.images import DEFAULT_MAX_PIXELS

MEGABYTE = 1024 * 1024
MIN_TOKEN_LENGTH = 16
# URL-unreserved characters only: a token goes unchanged into a query string, a cookie and a header.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~-]+")
TOKEN_ADVICE = "make one with: python -c 'import secrets; print(secrets.token_urlsafe())'"


@dataclass(frozen=True)
class ServeSettings:
    max_upload_bytes: int = 20 * MEGABYTE
    max_pixels: int | None = DEFAULT_MAX_PIXELS
    default_k: int = 30
    max_k: int = 100
    thumb_size: int = 256
    decode_threads: int = 2
    max_waiting: int = 64  # searches waiting for the model; past this a search gets 503 and retries later
    body_timeout: float = 30.0  # seconds a request body may take to arrive in full; past this 408
    # Host names accepted besides the address a request arrived on (and, on loopback, localhost, 127.0.0.1
    # and ::1): the names a reverse proxy or another machine uses for this server.
    allowed_hosts: tuple[str, ...] = ()
    # When set, every /api request must carry it (Authorization: Bearer, or the cookie /?token= sets).
    token: str | None = field(default=None, repr=False)

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
        if not (math.isfinite(self.body_timeout) and self.body_timeout > 0):
            raise ConfigError(
                f"the body timeout must be a positive number of seconds, got {self.body_timeout}"
            )
        for name in self.allowed_hosts:
            if not name or any(c.isspace() or c in "/@?#" for c in name):
                raise ConfigError(
                    f"an allowed host is a name or an address, such as photos.local; got {name!r}"
                )
        if self.token is not None:
            check_token(self.token)


def check_token(token: str) -> None:
    """Raise ConfigError unless ``token`` is long enough and of URL-safe characters (never shown)."""
    if len(token) < MIN_TOKEN_LENGTH or not TOKEN_PATTERN.fullmatch(token):
        raise ConfigError(
            f"the access token must be at least {MIN_TOKEN_LENGTH} characters of A-Z a-z 0-9 . _ ~ -; "
            + TOKEN_ADVICE
        )
