"""lookalike: find and recognise images by their content with CNN global descriptors, on a CPU.

The public names below are imported lazily, so ``import lookalike.errors`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "DEFAULT_MODEL": "lookalike.registry",
    "DescriptorSettings": "lookalike.extract",
    "Extractor": "lookalike.extract",
    "LookalikeError": "lookalike.errors",
    "Whitening": "lookalike.whitening",
    "classify_image": "lookalike.classify",
    "get_model_config": "lookalike.registry",
    "list_models": "lookalike.registry",
    "load_image": "lookalike.images",
    "pull": "lookalike.weights",
}


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'lookalike' has no attribute {name!r}")


__all__ = [*sorted(_PUBLIC), "__version__"]
