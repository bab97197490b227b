"""Dataset readers. A labelled folder: one sub-folder per class, the folder name is the label."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lookalike.errors import ConfigError
from lookalike.walk import walk_images


@dataclass(frozen=True)
class LabelledImages:
    paths: tuple[Path, ...]
    labels: tuple[str, ...]

    @property
    def classes(self) -> list[str]:
        return sorted(set(self.labels))


def labelled_folder(root: str | Path) -> LabelledImages:
    """Every image below ``root``, labelled with the name of its top-level sub-folder."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a folder")
    pairs = [(path, path.relative_to(root).parts[0]) for path in walk_images(root) if path.parent != root]
    if not pairs:
        raise ConfigError(f"{root} has no class sub-folders with images")
    return LabelledImages(tuple(p for p, _ in pairs), tuple(label for _, label in pairs))
