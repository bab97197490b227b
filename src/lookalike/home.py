"""Where lookalike keeps what it owns on this machine: ``$LOOKALIKE_HOME``, else the user cache directory.

The weights cache (``weights/``) and the models trained here (``models/``) live below it.
"""

from __future__ import annotations

import os
from pathlib import Path

from platformdirs import user_cache_dir


def lookalike_home() -> Path:
    """Root of lookalike's cache: ``$LOOKALIKE_HOME``, else the user cache directory."""
    return Path(os.environ.get("LOOKALIKE_HOME") or user_cache_dir("lookalike")).expanduser()


def models_folder() -> Path:
    """The folder of models trained on this machine: one sub-folder per model (``lookalike train``)."""
    return lookalike_home() / "models"
