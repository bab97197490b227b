"""The web application: the search page at /, the REST API under /api, its OpenAPI schema at
/openapi.json and Swagger UI at /docs — every file served from this machine, nothing from a CDN.

Around it, outermost first: any unexpected exception becomes a JSON 500 (``errors.Unexpected``); the Host
header and the access token are checked (``access.Access``); request bodies are bounded in size and time
(``params.BodyLimit``)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse
from fastapi.staticfiles import StaticFiles

from lookalike.recognize import RecognizerOptions
from lookalike.serve import api
from lookalike.serve.access import Access
from lookalike.serve.engine import Engine
from lookalike.serve.errors import Unexpected, install_error_handlers
from lookalike.serve.params import FORM_OVERHEAD, BodyLimit
from lookalike.serve.settings import ServeSettings

STATIC = Path(__file__).parent / "static"
PAGE_HEADERS = {
    # The page loads nothing from elsewhere; the browser is told to refuse it if it ever tried.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' blob: data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


def create_app(
    collection_path: str | Path,
    settings: ServeSettings | None = None,
    recognition: RecognizerOptions | None = None,
) -> FastAPI:
    """The app for one collection. The model and index load now, once; the collection closes at shutdown.
    ``recognition`` sets how /api/recognize votes (see :meth:`Engine.open`). It answers only requests whose
    Host names the address they arrived on or ``settings.allowed_hosts``; it asks for no token unless
    ``settings.token`` is set — serving beyond loopback without one is the caller's choice (the CLI
    refuses)."""
    settings = settings or ServeSettings()
    engine = Engine.open(collection_path, settings, recognition)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        engine.close()

    app = FastAPI(
        title="lookalike",
        summary="Search a collection of images by their content, and recognise what they show.",
        version=_version(),
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.engine = engine
    install_error_handlers(app)
    # Each middleware added wraps the ones before it.
    app.add_middleware(
        BodyLimit,
        max_bytes=settings.max_upload_bytes + FORM_OVERHEAD,
        upload_limit=settings.max_upload_bytes,
        timeout=settings.body_timeout,
    )
    app.add_middleware(Access, allowed_hosts=settings.allowed_hosts, token=settings.token)
    app.add_middleware(Unexpected)
    app.include_router(api.build_router(settings))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    _add_docs(app)

    @app.get("/", include_in_schema=False)
    @app.head("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html", headers=PAGE_HEADERS)

    return app


def _add_docs(app: FastAPI) -> None:
    """Swagger UI from the swagger-ui-bundle package's own files (FastAPI's default loads it from a CDN)."""
    import swagger_ui_bundle

    app.mount(
        "/docs/assets", StaticFiles(directory=str(swagger_ui_bundle.swagger_ui_path)), name="docs-assets"
    )

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "/openapi.json",
            title="lookalike API",
            swagger_js_url="/docs/assets/swagger-ui-bundle.js",
            swagger_css_url="/docs/assets/swagger-ui.css",
            swagger_favicon_url="/static/favicon.svg",
            swagger_ui_parameters={"validatorUrl": None},
        )


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("lookalike")
    except PackageNotFoundError:
        return "0"
