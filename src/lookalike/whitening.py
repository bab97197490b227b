"""Whitening of global descriptors: PCA-whitening and learned (discriminative) whitening.

Descriptors are ``(N, D)`` float32 rows. A :class:`Whitening` is an affine map ``x ↦ (x - mean) @ P.T``
followed by L2 normalisation; fitting is done in float64 and the result is stored in float32. It is saved
as a plain ``.npz`` of arrays (no pickle), so it can be read by anything that reads numpy files.

Eigenvalue floor: whitening divides by square roots of covariance eigenvalues. When there are fewer
samples (or matching pairs) than dimensions the covariance is singular, so eigenvalues below
``eig_floor · λ_max`` are raised to that value. This keeps the map finite; it does not make the
directions the data never varied in meaningful, so keep ``dim`` below the number of samples.
"""

from __future__ import annotations

import logging
import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from lookalike.errors import ConfigError, WhiteningError

log = logging.getLogger(__name__)

KINDS: Final = ("pca", "learned")
FORMAT_VERSION: Final = 1
DEFAULT_EIG_FLOOR: Final = 1e-6


def _l2n(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


@dataclass(frozen=True, eq=False)
class Whitening:
    """``apply(x) = L2((x - mean) @ projection.T)``; ``projection`` rows are ordered most useful first.

    ``mean`` has shape ``(D,)`` and ``projection`` ``(D_out, D)``; both are stored as read-only float32.
    ``kind`` is ``"pca"`` or ``"learned"``. Equality is identity (the fields are arrays).
    """

    mean: np.ndarray
    projection: np.ndarray
    kind: str

    def __post_init__(self) -> None:
        mean = np.array(self.mean, dtype=np.float32)  # copies, so the caller's arrays stay theirs
        projection = np.array(self.projection, dtype=np.float32)
        if self.kind not in KINDS:
            raise WhiteningError(f"unknown whitening kind {self.kind!r}; expected one of {', '.join(KINDS)}")
        if mean.ndim != 1 or projection.ndim != 2 or projection.shape[1] != mean.shape[0]:
            raise WhiteningError(
                f"whitening needs mean (D,) and projection (D_out, D), got {mean.shape} and {projection.shape}"
            )
        if projection.shape[0] == 0 or mean.shape[0] == 0:
            raise WhiteningError(f"whitening has an empty dimension: projection {projection.shape}")
        if not (np.isfinite(mean).all() and np.isfinite(projection).all()):
            raise WhiteningError("whitening mean or projection contains NaN or infinity")
        mean.setflags(write=False)
        projection.setflags(write=False)
        object.__setattr__(self, "mean", mean)
        object.__setattr__(self, "projection", projection)

    @property
    def dim(self) -> int:
        """Output dimension ``D_out``."""
        return int(self.projection.shape[0])

    @property
    def input_dim(self) -> int:
        """Input dimension ``D``."""
        return int(self.projection.shape[1])

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Whiten descriptors ``(N, D)`` into L2-normalised float32 rows ``(N, D_out)``."""
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise WhiteningError(f"whitening expects descriptors (N, {self.input_dim}), got shape {x.shape}")
        return _l2n((x.astype(np.float32, copy=False) - self.mean) @ self.projection.T).astype(np.float32)

    def reduce(self, dim: int) -> Whitening:
        """The same whitening keeping only the first ``dim`` output dimensions."""
        if not 1 <= dim <= self.dim:
            raise ConfigError(f"cannot reduce a {self.dim}-dimensional whitening to {dim} dimensions")
        return Whitening(self.mean, self.projection[:dim], self.kind)


# ---- fitting ---------------------------------------------------------------------------------------------


def _check_descriptors(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or not np.issubdtype(x.dtype, np.number):
        raise WhiteningError(f"whitening is fitted on numeric descriptors (N, D), got {x.dtype} {x.shape}")
    if x.shape[0] < 2:
        raise WhiteningError(f"whitening needs at least 2 descriptors, got {x.shape[0]}")
    if x.shape[1] == 0:
        raise WhiteningError("whitening needs descriptors with at least one dimension")
    x = x.astype(np.float64)
    if not np.isfinite(x).all():
        raise WhiteningError("descriptors contain NaN or infinity")
    return x


def _check_options(dim: int | None, eig_floor: float, input_dim: int) -> int:
    if not 0 < eig_floor < 1:
        raise ConfigError(
            f"eig_floor is relative to the largest eigenvalue and must be in (0, 1), got {eig_floor}"
        )
    if dim is None:
        return input_dim
    if not 1 <= dim <= input_dim:
        raise ConfigError(f"whitening dimension must be in 1..{input_dim}, got {dim}")
    return dim


def _eig_descending(c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (descending) and eigenvectors (columns) of a symmetric matrix, with a fixed sign each:
    the largest-magnitude entry of every eigenvector is positive, so fits are reproducible."""
    values, vectors = np.linalg.eigh((c + c.T) / 2)
    order = np.argsort(values)[::-1]
    values, vectors = values[order], vectors[:, order]
    pivots = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    return values, vectors * np.where(pivots < 0, -1.0, 1.0)


def _floored(values: np.ndarray, eig_floor: float, what: str, kept: int) -> np.ndarray:
    if not values[0] > 0:
        raise WhiteningError(f"{what}: the descriptors do not vary; there is nothing to whiten")
    floor = eig_floor * float(values[0])
    raised = int(np.count_nonzero(values[:kept] < floor))
    if raised:
        log.warning(
            "%s: %d of the %d kept eigenvalues are below %.1e of the largest and were raised to it; "
            "the data does not vary in those directions (too few samples?)",
            what,
            raised,
            kept,
            eig_floor,
        )
    return np.maximum(values, floor)


def fit_pca_whitening(
    x: np.ndarray, dim: int | None = None, eig_floor: float = DEFAULT_EIG_FLOOR
) -> Whitening:
    """PCA-whitening fitted on descriptors ``x`` ``(N, D)``, keeping ``dim`` components (default all ``D``).

    Centres on the mean, eigendecomposes the covariance ``Σ = Xcᵀ Xc / N``, and keeps the top ``dim``
    eigenvectors ``u_i`` scaled by ``1 / sqrt(λ_i)``, with ``λ_i`` raised to at least ``eig_floor · λ_1``
    (see the module docstring). The whitened training descriptors have identity covariance.
    """
    x = _check_descriptors(x)
    dim = _check_options(dim, eig_floor, x.shape[1])
    mean = x.mean(axis=0)
    centred = x - mean
    values, vectors = _eig_descending(centred.T @ centred / x.shape[0])
    values = _floored(values, eig_floor, "PCA-whitening", dim)
    projection = vectors[:, :dim].T / np.sqrt(values[:dim])[:, None]
    return Whitening(mean, projection, "pca")


def _check_pairs(pairs: np.ndarray, n: int) -> np.ndarray:
    pairs = np.asarray(pairs)
    if pairs.ndim != 2 or pairs.shape[1] != 2 or pairs.shape[0] == 0:
        raise WhiteningError(f"pairs must be a non-empty (P, 2) array of indices, got shape {pairs.shape}")
    if not np.issubdtype(pairs.dtype, np.integer):
        raise WhiteningError(f"pairs must hold integer indices, got {pairs.dtype}")
    if pairs.min() < 0 or pairs.max() >= n:
        raise WhiteningError(f"pair indices must be in 0..{n - 1}, got {pairs.min()}..{pairs.max()}")
    return pairs


def fit_learned_whitening(
    x: np.ndarray, pairs: np.ndarray, dim: int | None = None, eig_floor: float = DEFAULT_EIG_FLOOR
) -> Whitening:
    """Learned discriminative whitening (Mikolajczyk & Matas, ICCV 2007; Radenović et al., ECCV 2016).

    ``pairs`` ``(P, 2)`` are indices into ``x`` of matching descriptors (query, positive). The steps:

    1. ``m`` is the mean of all descriptors ``x``.
    2. ``C_S = Σ_pairs (x_i - x_j)(x_i - x_j)ᵀ / P``, the covariance of matching differences, and
       ``W = C_S^(-1/2)`` (eigenvalues floored as in the module docstring).
    3. ``C_D`` is the covariance of the whitened descriptors ``W (x - m)``. Up to a factor it is the
       covariance of differences over *all* pairs, which are nearly all non-matching, so it stands in
       for the inter-class covariance.
    4. ``C_D = V Λ Vᵀ`` with eigenvalues descending; ``P = Vᵀ W`` and the output is ``P (x - m)``.

    Matching differences have identity covariance after ``P``, and output dimensions come ordered by
    how far non-matching descriptors spread relative to matching ones, so ``dim`` (or
    :meth:`Whitening.reduce`) keeps the most discriminative directions.

    cirtorch's ``whitenlearn`` whitens with the inverse Cholesky factor of ``C_S`` instead of its
    symmetric inverse square root; the two differ by a rotation that step 4 absorbs, so ``P`` is the
    same up to the sign of each row. It centres on the mean of the pairs' query descriptors rather than
    of all descriptors.
    """
    x = _check_descriptors(x)
    pairs = _check_pairs(pairs, x.shape[0])
    dim = _check_options(dim, eig_floor, x.shape[1])
    mean = x.mean(axis=0)
    diffs = x[pairs[:, 0]] - x[pairs[:, 1]]
    values, vectors = _eig_descending(diffs.T @ diffs / diffs.shape[0])
    values = _floored(values, eig_floor, "learned whitening (matching pairs)", x.shape[1])
    whiten = (vectors / np.sqrt(values)) @ vectors.T  # C_S^(-1/2)
    whitened = (x - mean) @ whiten.T
    _, rotation = _eig_descending(whitened.T @ whitened / x.shape[0])
    projection = rotation[:, :dim].T @ whiten
    return Whitening(mean, projection, "learned")


# ---- files -----------------------------------------------------------------------------------------------


def save_whitening(whitening: Whitening, path: str | os.PathLike[str]) -> None:
    """Write ``whitening`` to ``path`` as an ``.npz`` of plain arrays, atomically.

    The file is written to a temporary name in the same directory and renamed over ``path``, so readers
    see either the old file or the new one. ``path`` is used as given (no ``.npz`` is appended).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(
                f,
                version=np.array(FORMAT_VERSION, dtype=np.int64),
                kind=np.array(whitening.kind),
                mean=whitening.mean,
                projection=whitening.projection,
            )
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_whitening(path: str | os.PathLike[str]) -> Whitening:
    """Read a whitening written by :func:`save_whitening`; anything else raises :class:`WhiteningError`.

    Pickled (object) arrays are refused, never unpickled.
    """
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise WhiteningError(f"{path}: not a whitening file (a single array, not an .npz)")
        with data:
            missing = {"version", "kind", "mean", "projection"} - set(data.files)
            if missing:
                raise WhiteningError(f"{path}: not a whitening file; missing {', '.join(sorted(missing))}")
            version, kind, mean, projection = (data[k] for k in ("version", "kind", "mean", "projection"))
    except WhiteningError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        # unreadable, truncated, not numpy, or an object array that would need pickle
        raise WhiteningError(f"{path}: cannot read whitening file: {exc}") from exc
    if version.shape != () or not np.issubdtype(version.dtype, np.integer) or int(version) != FORMAT_VERSION:
        raise WhiteningError(f"{path}: unsupported whitening file version {version!r}")
    if kind.shape != () or kind.dtype.kind != "U":
        raise WhiteningError(f"{path}: whitening kind must be a string, got {kind.dtype} {kind.shape}")
    for name, array in (("mean", mean), ("projection", projection)):
        if not np.issubdtype(array.dtype, np.floating):
            raise WhiteningError(f"{path}: {name} must be floating point, got {array.dtype}")
    return Whitening(mean, projection, str(kind))


__all__ = [
    "DEFAULT_EIG_FLOOR",
    "KINDS",
    "Whitening",
    "fit_learned_whitening",
    "fit_pca_whitening",
    "load_whitening",
    "save_whitening",
]
