"""A web page and REST API over a collection: upload an image, see the most similar ones."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lookalike.serve.settings import ServeSettings

if TYPE_CHECKING:
    from lookalike.serve.app import create_app

__all__ = ["ServeSettings", "create_app"]


def __getattr__(name: str) -> Any:
    # create_app imports FastAPI (about a second): loaded when first asked for, so that the command line,
    # which reads ServeSettings' defaults for `lookalike serve --help`, starts without it.
    if name == "create_app":
        from lookalike.serve.app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
