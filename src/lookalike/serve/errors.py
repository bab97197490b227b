"""Every error the API returns is JSON ``{"error": short message, "detail": specifics or null}`` — an
unexpected exception too: it is logged here with its traceback and answered as a bare 500."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lookalike.errors import (
    ConfigError,
    CorruptImageError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageError,
)

log = logging.getLogger(__name__)


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


class Unexpected:
    """ASGI middleware: an exception no handler answered is logged with its traceback and answered as
    JSON 500 that says nothing of it (when the response had started, the connection is cut instead)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                detail = "the server failed unexpectedly; what happened is in its log"
                await error_response(500, "internal error", detail)(scope, receive, send)
