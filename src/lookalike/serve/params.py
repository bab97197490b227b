"""Reading a search request: an uploaded image (multipart) or an indexed image id (form or JSON), plus
``k``, ``bbox`` and ``rerank``; the OpenAPI schema of that request, built from the server's settings and the
re-ranker registry; and refusing request bodies larger than the upload limit before they are read whole,
or slower than the body timeout."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import Annotated, Any

import anyio
from fastapi import Path
from starlette.datastructures import UploadFile
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from lookalike.collection.collection import BBox
from lookalike.errors import ConfigError
from lookalike.rerank import MAX_STAGES, NONE, Chain, parse_chain, registry_help
from lookalike.serve.errors import ApiError, error_response
from lookalike.serve.settings import MEGABYTE, ServeSettings

# Room for the multipart boundaries, part headers and the small fields beside the image.
FORM_OVERHEAD = 64 * 1024
MAX_CHAIN_LENGTH = 200  # characters of a rerank chain: room for every stage with every option

# Image ids are SQLite integers, signed 64-bit: anything outside is no id at all (422), while an id in range
# that no image has — zero and negative ones included — is unknown (404).
MIN_ID, MAX_ID = -(2**63), 2**63 - 1
ID_FIELD: dict[str, Any] = {"type": "integer", "format": "int64", "minimum": MIN_ID, "maximum": MAX_ID}
ImageId = Annotated[
    int, Path(ge=MIN_ID, le=MAX_ID, description="An image id, as search results give it (64-bit integer).")
]


def rerank_field() -> dict[str, Any]:
    """The ``rerank`` parameter's schema: a chain of the registry's re-rankers, as the CLI's ``--rerank``."""
    return {
        "type": "string",
        "default": NONE,
        "maxLength": MAX_CHAIN_LENGTH,
        "examples": [NONE, "aqe", "dba,aqe", "aqe:n=3,alpha=2"],
        "description": "none, or re-rankers applied left to right, separated by commas, each with optional "
        f"key=value options after a colon (at most {MAX_STAGES}). {registry_help()}",
    }


def search_request_body(settings: ServeSettings) -> dict[str, Any]:
    """The OpenAPI request body of POST /api/search, its ``k`` bounds those of ``settings``."""
    k = {"type": "integer", "minimum": 1, "maximum": settings.max_k, "default": settings.default_k}
    rerank = rerank_field()
    return {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "image": {"type": "string", "format": "binary", "description": "The query image."},
                        "id": {**ID_FIELD, "description": "Or: an indexed image id as the query."},
                        "k": k,
                        "bbox": {"type": "string", "example": "10,20,300,400", "description": "x0,y0,x1,y1"},
                        "rerank": rerank,
                    },
                }
            },
            "application/json": {
                "schema": {
                    "type": "object",
                    "required": ["id"],
                    "properties": {
                        "id": {**ID_FIELD, "description": "An indexed image id as the query."},
                        "k": k,
                        "bbox": {
                            "oneOf": [
                                {"type": "string", "example": "10,20,300,400"},
                                {"type": "array", "items": {"type": "number"}, "minItems": 4, "maxItems": 4},
                            ]
                        },
                        "rerank": rerank,
                    },
                }
            },
        },
    }


def recognize_request_body(settings: ServeSettings) -> dict[str, Any]:
    """The search request body minus ``k`` and ``rerank``: the schema of POST /api/recognize."""
    body = search_request_body(settings)
    content = {}
    for media, spec in body["content"].items():
        properties = {n: p for n, p in spec["schema"]["properties"].items() if n not in ("k", "rerank")}
        content[media] = {"schema": {**spec["schema"], "properties": properties}}
    return {**body, "content": content}


@dataclass(frozen=True)
class SearchRequest:
    image: bytes | None
    name: str
    image_id: int | None
    k: int
    bbox: BBox | None
    rerank: Chain = field(default_factory=Chain)


def parse_k(value: Any, default: int, maximum: int) -> int:
    if value is None or value == "":
        return default
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _invalid(f"k must be an integer from 1 to {maximum}, got {value!r}")
    try:
        k = int(value)
    except ValueError:
        raise _invalid(f"k must be an integer from 1 to {maximum}, got {value!r}") from None
    if not 1 <= k <= maximum:
        raise _invalid(f"k must be an integer from 1 to {maximum}, got {k}")
    return k


def parse_rerank(value: Any) -> Chain:
    """A re-ranking chain such as ``"dba,aqe"`` (see :mod:`lookalike.rerank.registry`); none when absent."""
    if value is None or value == "":
        return Chain()
    if not isinstance(value, str) or len(value) > MAX_CHAIN_LENGTH:
        raise _invalid(f"rerank must be a chain of re-rankers such as 'dba,aqe', got {value!r:.60}")
    try:
        return parse_chain(value)
    except ConfigError as exc:
        raise _invalid(f"rerank: {exc}") from None


def parse_bbox(value: Any) -> BBox | None:
    """``"x0,y0,x1,y1"`` or four numbers → a box in pixels with x0 < x1 and y0 < y1."""
    if value is None or value == "":
        return None
    parts = value.split(",") if isinstance(value, str) else value
    try:
        if not isinstance(parts, list) or len(parts) != 4 or any(isinstance(v, bool) for v in parts):
            raise ValueError
        x0, y0, x1, y1 = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise _invalid(f"bbox must be x0,y0,x1,y1 (four numbers, pixels), got {value!r}") from None
    if not all(math.isfinite(v) for v in (x0, y0, x1, y1)) or x1 <= x0 or y1 <= y0:
        raise _invalid(f"bbox must have finite x0 < x1 and y0 < y1, got {value!r}")
    return (x0, y0, x1, y1)


def parse_id(value: Any) -> int | None:
    """An image id: an integer of 64 bits (see MIN_ID), as a number or a string."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise _invalid(f"id must be an integer, got {value!r:.40}")
    try:
        image_id = int(value)
    except ValueError:
        raise _invalid(f"id must be an integer, got {value!r:.40}") from None
    if not MIN_ID <= image_id <= MAX_ID:
        raise _invalid(f"id must be a 64-bit integer (at most {MAX_ID}), got {str(value)[:40]}")
    return image_id


async def read_search_request(
    request: Request, settings: ServeSettings, with_k: bool = True
) -> SearchRequest:
    """The query of a POST /api/search (or /api/recognize, ``with_k=False``, which refuses ``k``):
    multipart or url-encoded form, or JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    image, name = None, "upload"
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        async with request.form(max_files=1, max_fields=8) as form:
            fields: dict[str, Any] = {key: form.get(key) for key in ("id", "k", "bbox", "rerank")}
            upload = form.get("image")
            if isinstance(upload, UploadFile):
                image = await _read_upload(upload, settings.max_upload_bytes)
                name = PurePosixPath((upload.filename or name).replace("\\", "/")).name or name
            elif upload is not None:
                raise _invalid("the image field must be a file upload")
    elif content_type == "application/json":
        try:
            fields = json.loads(await request.body())
        except ValueError as exc:
            raise _invalid(f"the body is not valid JSON: {exc}") from None
        except RecursionError:  # the parser's own depth guard: "[[[[…" nested past the recursion limit
            raise _invalid("the body is not valid JSON: nested too deeply") from None
        if not isinstance(fields, dict):
            raise _invalid('the JSON body must be an object such as {"id": 42}')
    else:
        raise ApiError(
            415,
            "unsupported request",
            "send multipart/form-data with an image file field, or a form or JSON with an id field",
        )
    image_id = parse_id(fields.get("id"))
    if (image is None) == (image_id is None):
        raise _invalid("give exactly one query: an image file, or the id of an indexed image")
    if not with_k and any(fields.get(key) not in (None, "") for key in ("k", "rerank")):
        raise _invalid(
            "k and rerank are not parameters here: the server's recognition options decide the vote"
        )
    k = parse_k(fields.get("k"), settings.default_k, settings.max_k)
    rerank = parse_rerank(fields.get("rerank"))
    return SearchRequest(image, name, image_id, k, parse_bbox(fields.get("bbox")), rerank)


async def _read_upload(upload: UploadFile, limit: int) -> bytes:
    data = await upload.read(limit + 1)
    if len(data) > limit:
        raise too_large(limit)
    if not data:
        raise _invalid("the uploaded file is empty")
    return data


def _invalid(detail: str) -> ApiError:
    return ApiError(422, "invalid parameter", detail)


def too_large(limit: int) -> ApiError:
    return ApiError(413, "upload too large", f"the limit is {limit / MEGABYTE:.3g} MB ({limit} bytes)")


def too_slow(timeout: float) -> ApiError:
    detail = f"the request body did not arrive within {timeout:g} s"
    return ApiError(408, "request timeout", detail, {"Connection": "close"})


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets 413 — at once when Content-Length says so,
    else as soon as that many bytes have arrived — so an oversized upload is never held whole; a body
    still incomplete ``timeout`` seconds after the request began gets 408, so a client trickling bytes
    cannot hold a connection and a request's memory for ever. Once the body is complete, ``receive`` is
    passed on untouched (a response may wait on it for the client's disconnect as long as it likes)."""

    def __init__(self, app: ASGIApp, max_bytes: int, upload_limit: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_limit = upload_limit
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            error = too_large(self.upload_limit)
            await error_response(error.status_code, error.error, error.detail)(scope, receive, send)
            return
        received, complete = 0, False
        deadline = anyio.current_time() + self.timeout

        async def limited() -> Message:
            nonlocal received, complete
            if complete:
                return await receive()
            try:
                with anyio.fail_after(max(0.0, deadline - anyio.current_time())):
                    message = await receive()
            except TimeoutError:
                raise too_slow(self.timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise too_large(self.upload_limit)
                complete = not message.get("more_body", False)
            return message

        await self.app(scope, limited, send)
