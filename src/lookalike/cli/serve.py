"""`lookalike serve`: the search page and REST API of a collection, on this machine unless told otherwise.

Served beyond loopback (``--host 0.0.0.0`` or another address), it needs an access token (``--token`` or
LOOKALIKE_TOKEN) and refuses to start without one: anyone who reaches the port could otherwise download the
photos."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import re
from pathlib import Path

import typer

from lookalike.cli.collections import COLLECTION, collection_path
from lookalike.cli.common import console, errors, fail, reported_errors
from lookalike.cli.options import recognition_options
from lookalike.recognize.service import RecognizerOptions
from lookalike.serve.settings import MEGABYTE, TOKEN_ADVICE, ServeSettings


@recognition_options
def serve(
    collection: Path = COLLECTION,
    host: str = typer.Option(
        "127.0.0.1",
        "--host",
        help="Address to listen on; 0.0.0.0 opens the page to other machines (then --token is required).",
    ),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    max_upload_mb: float = typer.Option(
        ServeSettings.max_upload_bytes / MEGABYTE,
        "--max-upload-mb",
        min=0.001,
        help="Largest upload accepted, in MB (1 MB = 2^20 bytes).",
    ),
    max_pixels: int = typer.Option(
        ServeSettings.max_pixels,
        "--max-pixels",
        min=1,
        help="Largest image accepted, in pixels (width × height).",
    ),
    recognition: RecognizerOptions = RecognizerOptions(),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="LOOKALIKE_TOKEN",
        show_default=False,
        metavar="TOKEN",
        help="Access token: every /api request then needs 'Authorization: Bearer TOKEN', or the cookie that "
        "opening /?token=TOKEN once in the browser sets. Required with a --host other than loopback.",
    ),
    allowed_hosts: list[str] = typer.Option(
        [],
        "--allowed-host",
        show_default=False,
        metavar="NAME",
        help="Also answer requests for this host name (a reverse proxy's, or this machine's name on the "
        "network); repeat for several. Other Host headers get 421.",
    ),
    body_timeout: float = typer.Option(
        ServeSettings.body_timeout,
        "--body-timeout",
        min=0.1,
        help="Seconds an upload may take to arrive; slower ones get 408.",
    ),
) -> None:
    """Serve a web page and a REST API: upload an image, see the most similar ones and, when the collection
    has labelled images (one folder per class, or --labels), what it shows. Ctrl+C stops.

    Only requests whose Host header names this server are answered (the listening address; localhost,
    127.0.0.1 and [::1] on loopback; any --allowed-host). Listening beyond loopback without --token (or
    LOOKALIKE_TOKEN) is refused: the command exits with an error instead of serving the photos to anyone."""
    import uvicorn

    from lookalike.serve import create_app

    if not _loopback(host) and not token:
        raise fail(
            f"--host {host} would let anyone who reaches this machine download the collection's images: give "
            f"an access token with --token TOKEN or LOOKALIKE_TOKEN ({TOKEN_ADVICE}), or listen on 127.0.0.1"
        )
    path = collection_path(collection)
    with reported_errors():
        settings = ServeSettings(
            max_upload_bytes=round(max_upload_mb * MEGABYTE),
            max_pixels=max_pixels,
            body_timeout=body_timeout,
            allowed_hosts=(*allowed_hosts, host) if host not in WILDCARDS else tuple(allowed_hosts),
            token=token or None,
        )
        app = create_app(path, settings, recognition)
    address = f"[{host}]" if ":" in host else host
    console.print(
        f"lookalike: {path} on http://{address}:{port}/ (API: /docs); Ctrl+C stops", highlight=False
    )
    if token:
        console.print(
            f"access token required: open http://{address}:{port}/?token=TOKEN once in the browser, or send "
            "'Authorization: Bearer TOKEN'",
            highlight=False,
        )
    if not _loopback(host):
        errors.print(
            f"[yellow]warning:[/] listening on {host}: anyone who reaches this machine and has the token can "
            "search the collection and download its images; the connection is plain HTTP, so use a network "
            "you trust or an HTTPS proxy in front",
            highlight=False,
        )
    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=10)
    logging.getLogger("uvicorn.access").addFilter(_hide_tokens)  # after Config, which sets logging up
    server = uvicorn.Server(config)
    # On Ctrl+C or SIGTERM uvicorn stops accepting, finishes the requests under way and closes the
    # collection; it then re-raises Ctrl+C, but a stop that was asked for is a success.
    with contextlib.suppress(KeyboardInterrupt):
        server.run()
    if not server.started:
        raise typer.Exit(1)


TOKEN_IN_QUERY = re.compile(r"(?<=[?&]token=)[^&\s]*")


def _hide_tokens(record: logging.LogRecord) -> bool:
    """Keep the access log free of tokens: ``GET /?token=…`` is logged as ``/?token=***``."""
    if isinstance(record.args, tuple):
        record.args = tuple(TOKEN_IN_QUERY.sub("***", a) if isinstance(a, str) else a for a in record.args)
    return True


WILDCARDS = ("0.0.0.0", "::", "")  # every address of the machine: a request names the one it arrived on


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
