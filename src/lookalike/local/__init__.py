"""Local features for spatial verification: keypoints and descriptors (XFeat, or SIFT without weights),
matching, and the geometric check that tells *the same* object from a look-alike.

:func:`local_describer` resolves a name (``xfeat``, ``sift``, ``auto``) to a :class:`LocalDescriber`;
``auto`` is XFeat when its weights are cached (or can be pulled), SIFT otherwise, and says which it chose.
"""

from __future__ import annotations

import functools
import logging
from typing import Final

from lookalike.errors import ConfigError, WeightsNotAvailableError
from lookalike.local.features import LocalDescriber, LocalFeatures, working_image
from lookalike.local.sift import SiftDescriber
from lookalike.local.xfeat import MODEL_NAME as XFEAT_MODEL
from lookalike.local.xfeat import XFeatDescriber

log = logging.getLogger(__name__)

AUTO: Final = "auto"
LOCAL_FEATURES: Final = ("xfeat", "sift")
DEFAULT_MAX_KEYPOINTS: Final = 512  # as accurate as 1,024 on edited copies, 3.6× faster to verify
DEFAULT_MAX_SIZE: Final = 640


def local_describer(
    name: str, max_keypoints: int = DEFAULT_MAX_KEYPOINTS, max_size: int = DEFAULT_MAX_SIZE
) -> LocalDescriber:
    """The describer ``name`` (``xfeat``, ``sift`` or ``auto``), at most ``max_keypoints`` keypoints on an
    image resized to a long side of ``max_size`` pixels. The same arguments give the same (shared) object."""
    name = check_local_features(name, max_keypoints, max_size)
    return _describer(name, max_keypoints, max_size)


def check_local_features(name: str, max_keypoints: int, max_size: int, who: str = "local features") -> str:
    """``name`` lower-cased, after checking it and the bounds (the one place they are checked)."""
    if not isinstance(name, str) or name.lower() not in (*LOCAL_FEATURES, AUTO):
        raise ConfigError(f"{who}: features are one of {', '.join(LOCAL_FEATURES)} or auto, got {name!r}")
    if not 16 <= max_keypoints <= 16384:
        raise ConfigError(f"{who}: keypoints are 16 to 16384 per image, got {max_keypoints}")
    if not 64 <= max_size <= 4096:
        raise ConfigError(f"{who}: the working size is 64 to 4096 pixels, got {max_size}")
    return name.lower()


@functools.lru_cache(maxsize=8)
def _describer(name: str, max_keypoints: int, max_size: int) -> LocalDescriber:
    if name == AUTO:
        try:
            return _xfeat(max_keypoints, max_size)
        except WeightsNotAvailableError as exc:
            log.warning("local features: XFeat weights are not available (%s); using SIFT", exc)
            return SiftDescriber(max_keypoints, max_size)
    if name == "sift":
        return SiftDescriber(max_keypoints, max_size)
    return _xfeat(max_keypoints, max_size)


def _xfeat(max_keypoints: int, max_size: int) -> XFeatDescriber:
    from lookalike.local.xfeat import XFeatNet
    from lookalike.registry import get_model_config
    from lookalike.weights import load_into, load_weights, weights_sha256

    config = get_model_config(XFEAT_MODEL)
    net = XFeatNet()
    load_into(net, load_weights(config), XFEAT_MODEL)
    return XFeatDescriber(net.eval(), max_keypoints, max_size, weights_sha256=weights_sha256(config))


__all__ = [
    "AUTO",
    "DEFAULT_MAX_KEYPOINTS",
    "DEFAULT_MAX_SIZE",
    "LOCAL_FEATURES",
    "LocalDescriber",
    "LocalFeatures",
    "SiftDescriber",
    "XFeatDescriber",
    "check_local_features",
    "local_describer",
    "working_image",
]
