"""The REST API under /api: search, images, thumbnails, info, health."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from PIL import Image

from lookalike.collection import SearchHit
from lookalike.collection.store import ImageRecord
from lookalike.errors import ConfigError, ImageError
from lookalike.serve.engine import Engine
from lookalike.serve.errors import ApiError, upload_error
from lookalike.serve.params import SEARCH_REQUEST_BODY, read_search_request
from lookalike.serve.schemas import (
    ERROR_RESPONSES,
    HealthResponse,
    Hit,
    InfoResponse,
    Limits,
    QueryInfo,
    SearchResponse,
)

router = APIRouter(prefix="/api", tags=["api"])

IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {404: ERROR_RESPONSES[404]}


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


@router.post(
    "/search",
    response_model=SearchResponse,
    responses={s: ERROR_RESPONSES[s] for s in (404, 413, 415, 422, 503)},
    openapi_extra={"requestBody": SEARCH_REQUEST_BODY},
    summary="The k most similar indexed images to an uploaded image or an indexed image",
)
async def search(request: Request) -> SearchResponse:
    """Send an image as multipart field `image`, or an indexed image's `id` (form or JSON). `k` (default
    30, at most 100) results; `bbox` "x0,y0,x1,y1" crops the query first. The image's content decides its
    format, never its name."""
    started = time.perf_counter()
    engine = engine_of(request)
    asked = await read_search_request(request, engine.settings)
    bbox = list(asked.bbox) if asked.bbox else None
    try:
        if asked.image_id is not None:
            record = await engine.record(asked.image_id)
            name, width, height = Path(record.path).name, record.width, record.height
            if asked.bbox is None:
                hits = await engine.search(record.id, asked.k)
            else:
                image = await _indexed_image(engine, record)
                hits = await engine.search(await engine.describe(image, asked.bbox), asked.k)
        else:
            assert asked.image is not None
            image = await engine.decode(asked.image, asked.name)
            name, width, height = asked.name, image.width, image.height
            hits = await engine.search(await engine.describe(image, asked.bbox), asked.k)
    except (ImageError, ConfigError) as exc:
        raise upload_error(exc) from exc
    query = QueryInfo(
        kind="upload" if asked.image_id is None else "id",
        id=asked.image_id,
        name=name,
        width=width,
        height=height,
        bbox=bbox,
    )
    records = await engine.records([hit.id for hit in hits])
    return SearchResponse(
        query=query,
        k=asked.k,
        took_ms=round((time.perf_counter() - started) * 1000, 1),
        results=[_hit(request, hit, records.get(hit.id)) for hit in hits],
    )


# POST /api/recognize — kNN recognition (lookalike.recognize) belongs here, beside search: same upload
# handling (read_search_request, engine.decode, engine.describe), its own response model in schemas.py.


@router.get(
    "/images/{image_id}",
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}, **IMAGE_RESPONSES},
    summary="The original file of an indexed image",
)
async def image(request: Request, image_id: int) -> Response:
    engine = engine_of(request)
    record = await engine.record(image_id)
    path = engine.file(record)
    if not path.is_file():
        raise ApiError(404, "file missing", f"image {image_id} is no longer on disk; re-index the collection")
    headers = {
        "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.name)}",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return FileResponse(path, media_type=await engine.media_type(record), headers=headers)


@router.get(
    "/thumbs/{image_id}",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}}}, **IMAGE_RESPONSES},
    summary="A JPEG thumbnail of an indexed image (made once, then cached in the collection)",
)
async def thumbnail(request: Request, image_id: int) -> Response:
    engine = engine_of(request)
    record = await engine.record(image_id)
    try:
        made = await engine.thumbnail(record)
    except ImageError as exc:
        raise ApiError(404, "file unreadable", f"image {image_id}: {exc.reason}") from exc
    headers = {"X-Content-Type-Options": "nosniff", "Cache-Control": "max-age=3600"}
    if isinstance(made, bytes):
        return Response(made, media_type="image/jpeg", headers=headers)
    return FileResponse(made, media_type="image/jpeg", headers=headers)


@router.get("/info", response_model=InfoResponse, summary="The collection's settings, counts and limits")
async def info(request: Request) -> InfoResponse:
    engine = engine_of(request)
    settings = engine.settings
    return InfoResponse(
        collection=await engine.info(),
        model=engine.model,
        precision=engine.precision,
        indexed=await engine.indexed(),
        limits=Limits(
            max_upload_bytes=settings.max_upload_bytes,
            max_pixels=settings.max_pixels,
            default_k=settings.default_k,
            max_k=settings.max_k,
            thumb_size=settings.thumb_size,
        ),
    )


@router.get("/health", response_model=HealthResponse, summary="Whether the server answers and its index")
async def health(request: Request) -> HealthResponse:
    return HealthResponse(status="ok", indexed=await engine_of(request).indexed())


async def _indexed_image(engine: Engine, record: ImageRecord) -> Image.Image:
    try:
        return await engine.load(record)
    except ImageError as exc:
        raise ApiError(404, "file unreadable", f"image {record.id}: {exc.reason}") from exc


def _hit(request: Request, hit: SearchHit, record: ImageRecord | None) -> Hit:
    root = request.scope.get("root_path", "")
    return Hit(
        rank=hit.rank,
        id=hit.id,
        path=hit.path,
        name=Path(hit.path).name,
        score=round(hit.score, 6),
        width=record.width if record else None,
        height=record.height if record else None,
        image_url=f"{root}/api/images/{hit.id}",
        thumb_url=f"{root}/api/thumbs/{hit.id}",
    )
