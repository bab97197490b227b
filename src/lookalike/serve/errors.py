"""Every error the API returns is JSON ``{"error": short message, "detail": specifics or null}``."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from lookalike.errors import (
    ConfigError,
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)


class ApiError(HTTPException):
    """An error answered as ``status`` with a JSON body; raise it anywhere in a request."""

    def __init__(
        self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status, detail, headers)
        self.error = error


def upload_error(exc: ImageError | ConfigError) -> ApiError:
    """What an uploaded image that cannot be used means for the client."""
    if isinstance(exc, UnsupportedImageError):
        return ApiError(415, "unsupported image", exc.reason)
    if isinstance(exc, ImageTooLargeError):
        return ApiError(413, "image has too many pixels", exc.reason)
    if isinstance(exc, CorruptImageError):
        return ApiError(422, "corrupt image", exc.reason)
    if isinstance(exc, ImageError):
        return ApiError(422, "unreadable image", exc.reason)
    return ApiError(422, "invalid parameter", str(exc))


def error_response(
    status: int, error: str, detail: Any = None, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"error": error, "detail": jsonable_encoder(detail)}, status, headers)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if isinstance(exc, ApiError):
        return error_response(exc.status_code, exc.error, exc.detail, exc.headers)
    phrase = HTTPStatus(exc.status_code).phrase.lower()
    detail = exc.detail if exc.detail != HTTPStatus(exc.status_code).phrase else None
    return error_response(exc.status_code, phrase, detail, exc.headers)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    problems = [{"at": list(e.get("loc", ())), "problem": e.get("msg", "")} for e in exc.errors()]
    return error_response(422, "invalid parameter", problems)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
