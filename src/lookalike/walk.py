"""Find image files under folders: recursive, hidden files skipped, symlink loops and unreadable folders survived."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path

from lookalike.images import is_image_file

log = logging.getLogger(__name__)


def walk_images(root: str | Path, follow_links: bool = True) -> Iterator[Path]:
    """Image files below ``root`` in a stable (sorted) order; each real folder is visited once."""
    root = Path(root)
    seen: set[tuple[int, int]] = set()

    def on_error(error: OSError) -> None:
        log.warning("cannot read %s: %s", error.filename, error.strerror)

    for folder, subfolders, files in os.walk(root, followlinks=follow_links, onerror=on_error):
        try:
            stat = os.stat(folder)
        except OSError:
            subfolders[:] = []
            continue
        if (stat.st_dev, stat.st_ino) in seen:
            subfolders[:] = []
            continue
        seen.add((stat.st_dev, stat.st_ino))
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder) / name
            if is_image_file(path):
                yield path


def expand_inputs(inputs: Iterable[str | Path]) -> Iterator[Path]:
    """Files as given, folders walked recursively."""
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            yield from walk_images(path)
        else:
            yield path


def canonical_path(path: str | Path) -> Path:
    """``path`` with its folder resolved the way the kernel resolves it; the file name itself is kept
    (a symlinked file is named where it is linked, not where it points)."""
    joined = os.path.join(os.getcwd(), os.fspath(path))
    folder, name = os.path.split(joined)
    return Path(os.path.realpath(folder)) / name
