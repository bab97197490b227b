"""A web page and REST API over a collection: upload an image, see the most similar ones."""

from lookalike.serve.app import create_app
from lookalike.serve.settings import ServeSettings

__all__ = ["ServeSettings", "create_app"]
