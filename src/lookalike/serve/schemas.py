"""The JSON the API returns, as pydantic models (they make the OpenAPI schema at /openapi.json)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from lookalike.rerank import reranker_names


class ErrorBody(BaseModel):
    error: str = Field(description="What went wrong, in a few words.")
    detail: Any = Field(None, description="Specifics: a sentence, or the list of invalid parameters.")


class Hit(BaseModel):
    rank: int
    id: int = Field(description="Image id in the collection: use it with /api/images, /api/thumbs, search.")
    path: str = Field(description="The file as indexed, relative to the collection's root folder.")
    name: str = Field(description="The file name alone.")
    score: float = Field(description="Cosine similarity to the query (1 = same descriptor).")
    width: int | None
    height: int | None
    image_url: str
    thumb_url: str


class QueryInfo(BaseModel):
    kind: Literal["upload", "id"]
    id: int | None = Field(None, description="The indexed image searched with (kind 'id').")
    name: str
    width: int | None
    height: int | None
    bbox: list[float] | None = Field(None, description="The crop described, x0, y0, x1, y1 in pixels.")


class SearchResponse(BaseModel):
    query: QueryInfo
    k: int
    rerank: str = Field(
        description="The re-ranking chain applied, spelled canonically: none, or stages of "
        f"{', '.join(reranker_names())} separated by commas (options that differ from the default after a colon)."
    )
    took_ms: float = Field(description="Time spent in the server: decoding, describing, searching.")
    results: list[Hit]


class Neighbour(Hit):
    label: str = Field(description="The reference's label (its class folder, or from the labels CSV).")


class RecognizeResponse(BaseModel):
    query: QueryInfo
    label: str | None = Field(description="What the image shows; null only when there is no reference.")
    confidence: float | None = Field(
        description="The winning class's score: rank answers by it, a low one means 'probably none of them'."
    )
    method: str = Field(description="The voting rule: knn, 1nn, mean or alpha.")
    took_ms: float = Field(description="Time spent in the server: decoding, describing, voting.")
    neighbours: list[Neighbour] = Field(description="The labelled neighbours that voted, nearest first.")


class Recognition(BaseModel):
    method: str
    k: int
    transform: str
    alpha: float | None
    whitened: bool = Field(description="References and queries are PCA-whitened (fitted on the references).")
    references: int = Field(description="Labelled images that vote.")
    classes: list[str]


class Limits(BaseModel):
    max_upload_bytes: int
    max_pixels: int | None
    default_k: int
    max_k: int
    thumb_size: int


class InfoResponse(BaseModel):
    collection: dict[str, Any] = Field(description="Settings, counts and size, as `lookalike info --json`.")
    model: str
    precision: str
    indexed: int = Field(description="Images in the search index.")
    limits: Limits
    recognition: Recognition | None = Field(
        description="How /api/recognize votes; null when the collection has no labelled images."
    )


class HealthResponse(BaseModel):
    status: Literal["ok"]
    indexed: int


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"description": description, "model": ErrorBody}
    for status, description in {
        404: "no indexed image has this id",
        408: "the request body did not arrive in full within the body timeout",
        409: "recognition needs labelled images and this collection has none",
        413: "the upload is larger than the limit, or the image has more pixels than the limit",
        415: "the upload is not an image in a readable format (content is sniffed, the name is ignored)",
        422: "a parameter is missing or invalid, or the image is corrupt",
        503: "too many searches are waiting; retry after Retry-After seconds",
    }.items()
}
