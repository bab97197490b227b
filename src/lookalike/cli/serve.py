"""`lookalike serve`: the search page and REST API of a collection, on this machine unless told otherwise."""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path

import typer

from lookalike.cli.collections import COLLECTION, collection_path
from lookalike.cli.common import console, errors, reported_errors
from lookalike.cli.recognize import ALPHA, LABELS, METHOD, TRANSFORM, WHITEN, K
from lookalike.images import DEFAULT_MAX_PIXELS


def serve(
    collection: Path = COLLECTION,
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on; 0.0.0.0 opens the page to other machines."
    ),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    max_upload_mb: float = typer.Option(
        20.0, "--max-upload-mb", min=0.001, help="Largest upload accepted, in MB (1 MB = 2^20 bytes)."
    ),
    max_pixels: int = typer.Option(
        DEFAULT_MAX_PIXELS, "--max-pixels", min=1, help="Largest image accepted, in pixels (width × height)."
    ),
    method: str = METHOD,
    k: int = K,
    transform: str = TRANSFORM,
    alpha: float = ALPHA,
    labels: Path = LABELS,
    whiten: str = WHITEN,
) -> None:
    """Serve a web page and a REST API: upload an image, see the 30 most similar and, when the collection has
    labelled images (one folder per class, or --labels), what it shows. Ctrl+C stops."""
    import uvicorn

    from lookalike.recognize import RecognizerOptions
    from lookalike.serve import ServeSettings, create_app
    from lookalike.serve.settings import MEGABYTE

    path = collection_path(collection)
    with reported_errors():
        settings = ServeSettings(max_upload_bytes=round(max_upload_mb * MEGABYTE), max_pixels=max_pixels)
        recognition = RecognizerOptions(method, k, transform, alpha, labels, whiten)
        app = create_app(path, settings, recognition)
    address = f"[{host}]" if ":" in host else host
    console.print(
        f"lookalike: {path} on http://{address}:{port}/ (API: /docs); Ctrl+C stops", highlight=False
    )
    if not _loopback(host):
        errors.print(
            f"[yellow]warning:[/] listening on {host}: anyone who reaches this machine can search the "
            "collection and download its images (there is no login)",
            highlight=False,
        )
    server = uvicorn.Server(
        uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    )
    # On Ctrl+C or SIGTERM uvicorn stops accepting, finishes the requests under way and closes the
    # collection; it then re-raises Ctrl+C, but a stop that was asked for is a success.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise typer.Exit(1)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
