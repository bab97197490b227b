"""The REST API under /api: search, recognize, images, thumbnails, info, health."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, Response
from PIL import Image

from lookalike.collection import SearchHit
from lookalike.collection.store import ImageRecord
from lookalike.errors import ConfigError, ImageError
from lookalike.images import crop_bbox
from lookalike.serve.engine import Engine
from lookalike.serve.errors import ApiError, upload_error
from lookalike.serve.files import OpenedFileResponse
from lookalike.serve.params import (
    ImageId,
    SearchRequest,
    read_search_request,
    recognize_request_body,
    search_request_body,
)
from lookalike.serve.schemas import (
    ERROR_RESPONSES,
    ErrorBody,
    HealthResponse,
    Hit,
    InfoResponse,
    Limits,
    Neighbour,
    QueryInfo,
    Recognition,
    RecognizeResponse,
    SearchResponse,
)
from lookalike.serve.settings import ServeSettings

router = APIRouter()  # the routes whose schema is the same for every server; build_router adds the rest

IMAGE_RESPONSES: dict[int | str, dict[str, Any]] = {
    404: {"description": "no indexed image has this id, or its file is gone or refused", "model": ErrorBody},
    409: {"description": "the file changed on disk since it was indexed (re-index)", "model": ErrorBody},
    422: ERROR_RESPONSES[422],
}


def engine_of(request: Request) -> Engine:
    return request.app.state.engine


def build_router(settings: ServeSettings) -> APIRouter:
    """The REST API under /api, its OpenAPI schema made from ``settings`` (k's default and maximum) and
    the re-ranker registry (what ``rerank`` accepts)."""
    api = APIRouter(prefix="/api", tags=["api"])
    api.add_api_route(
        "/search",
        search,
        methods=["POST"],
        response_model=SearchResponse,
        responses={s: ERROR_RESPONSES[s] for s in (404, 408, 413, 415, 422, 503)},
        openapi_extra={"requestBody": search_request_body(settings)},
        summary="The k most similar indexed images to an uploaded image or an indexed image",
        description=SEARCH_DESCRIPTION.format(default_k=settings.default_k, max_k=settings.max_k),
    )
    api.add_api_route(
        "/recognize",
        recognize,
        methods=["POST"],
        response_model=RecognizeResponse,
        responses={s: ERROR_RESPONSES[s] for s in (404, 408, 409, 413, 415, 422, 503)},
        openapi_extra={"requestBody": recognize_request_body(settings)},
        summary="What an uploaded or indexed image shows, by its nearest labelled images",
    )
    api.include_router(router)
    return api


SEARCH_DESCRIPTION = """Send an image as multipart field `image`, or an indexed image's `id` (form or JSON).
`k` (default {default_k}, at most {max_k}) results; `bbox` "x0,y0,x1,y1" crops the query first; `rerank`
re-ranks by a chain such as "aqe" or "dba,aqe" (422 when it is not one; an indexed query never counts
among its own neighbours). The image's content decides its format, never its name."""


async def search(request: Request) -> SearchResponse:
    started = time.perf_counter()
    engine = engine_of(request)
    asked = await read_search_request(request, engine.settings)
    query, target, image = await _query(engine, asked)
    try:
        hits = await engine.search(target, asked.k, str(asked.rerank), image)
    except (ImageError, ConfigError) as exc:
        raise upload_error(exc) from exc
    records = await engine.records([hit.id for hit in hits])
    return SearchResponse(
        query=query,
        k=asked.k,
        rerank=str(asked.rerank),
        took_ms=round((time.perf_counter() - started) * 1000, 1),
        results=[_hit(request, hit, records.get(hit.id)) for hit in hits],
    )


async def recognize(request: Request) -> RecognizeResponse:
    """Send an image as multipart field `image`, or an indexed image's `id` (an indexed image is among the
    references, so it finds itself). `bbox` "x0,y0,x1,y1" crops the query first. The answer is the label
    with the highest vote, its confidence and the neighbours that voted; see `recognition` in /api/info."""
    started = time.perf_counter()
    engine = engine_of(request)
    asked = await read_search_request(request, engine.settings, with_k=False)
    query, target, _ = await _query(engine, asked)
    try:
        prediction = await engine.recognize(target)
    except (ImageError, ConfigError) as exc:
        raise upload_error(exc) from exc
    recognizer = engine.recognizer
    assert recognizer is not None
    records = await engine.records([n.id for n in prediction.neighbours])
    neighbours = []
    for rank, n in enumerate(prediction.neighbours, start=1):
        hit = SearchHit(rank, n.id, recognizer.path(n.id), n.similarity)
        neighbours.append(Neighbour(**_hit(request, hit, records.get(n.id)).model_dump(), label=n.label))
    return RecognizeResponse(
        query=query,
        label=prediction.label,
        confidence=round(prediction.confidence, 6) if prediction.label is not None else None,
        method=recognizer.method,
        took_ms=round((time.perf_counter() - started) * 1000, 1),
        neighbours=neighbours,
    )


@router.get(
    "/images/{image_id}",
    response_class=FileResponse,
    responses={200: {"content": {"image/*": {}}}, **IMAGE_RESPONSES},
    summary="The original file of an indexed image",
)
@router.head("/images/{image_id}", include_in_schema=False)
async def image(request: Request, image_id: ImageId) -> Response:
    """The file as indexed. Only a regular file inside the collection's folder that is still the one
    indexed (same size, and same time or content) is sent: else 404, or 409 when it changed."""
    engine = engine_of(request)
    record = await engine.record(image_id)
    opened, media = await engine.open_file(record)
    headers = {
        "Content-Disposition": f"inline; filename*=UTF-8''{quote(opened.name)}",
        "X-Content-Type-Options": "nosniff",
        "Cache-Control": "no-cache",
    }
    return OpenedFileResponse(opened, media, headers)


@router.get(
    "/thumbs/{image_id}",
    response_class=FileResponse,
    responses={200: {"content": {"image/jpeg": {}}}, **IMAGE_RESPONSES},
    summary="A JPEG thumbnail of an indexed image (made once, then cached in the collection)",
)
@router.head("/thumbs/{image_id}", include_in_schema=False)
async def thumbnail(request: Request, image_id: ImageId) -> Response:
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
        recognition=_recognition(engine),
    )


@router.get("/health", response_model=HealthResponse, summary="Whether the server answers and its index")
@router.head("/health", include_in_schema=False)
async def health(request: Request) -> HealthResponse:
    return HealthResponse(status="ok", indexed=await engine_of(request).indexed())


async def _query(
    engine: Engine, asked: SearchRequest
) -> tuple[QueryInfo, np.ndarray | int, Image.Image | None]:
    """What the query is, and what to search with: the descriptor of an upload or of a crop of an indexed
    image, described now, with the pixels it was made from; the id of an indexed image searched whole (its
    stored descriptor and local features are used)."""
    bbox = list(asked.bbox) if asked.bbox else None
    kind: Literal["upload", "id"] = "upload" if asked.image_id is None else "id"
    if asked.image_id is not None:
        record = await engine.record(asked.image_id)
        info = QueryInfo(
            kind=kind,
            id=record.id,
            name=Path(record.path).name,
            width=record.width,
            height=record.height,
            bbox=bbox,
        )
        if asked.bbox is None:
            return info, record.id, None
        image = await _indexed_image(engine, record)
    else:
        assert asked.image is not None
        try:
            image = await engine.decode(asked.image, asked.name)
        except ImageError as exc:
            raise upload_error(exc) from exc
        info = QueryInfo(
            kind=kind, id=None, name=asked.name, width=image.width, height=image.height, bbox=bbox
        )
    try:
        vector = await engine.describe(image, asked.bbox)
    except (ImageError, ConfigError) as exc:
        raise upload_error(exc) from exc
    return info, vector, crop_bbox(image, asked.bbox) if asked.bbox else image


async def _indexed_image(engine: Engine, record: ImageRecord) -> Image.Image:
    try:
        return await engine.load(record)
    except ImageError as exc:
        raise ApiError(404, "file unreadable", f"image {record.id}: {exc.reason}") from exc


def _recognition(engine: Engine) -> Recognition | None:
    recognizer = engine.recognizer
    if recognizer is None:
        return None
    classifier = recognizer.classifier
    return Recognition(
        method=recognizer.method,
        k=classifier.k,
        transform=recognizer.transform,
        alpha=classifier.alpha,
        whitened=recognizer.whitened,
        references=len(recognizer.labels),
        classes=recognizer.classes,
    )


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
