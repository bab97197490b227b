"""Whitening of global descriptors: PCA-whitening and learned (discriminative) whitening.

Descriptors are ``(N, D)`` float32 rows. A :class:`Whitening` is an affine map ``x ↦ (x - mean) @ P.T``
followed by L2 normalisation; fitting is done in float64 and the result is stored in float32. It is saved
as a plain ``.npz`` of arrays (no pickle), so it can be read by anything that reads numpy files.

Eigenvalue floor: whitening divides by square roots of covariance eigenvalues. When there are fewer
samples (or matching pairs) than dimensions the covariance is singular, so eigenvalues below
``eig_floor · λ_max`` are raised to that value. This keeps the map finite; it does not make the
directions the data never varied in meaningful, so keep ``dim`` below the number of samples.

Whitening a collection on itself (:func:`choose_pca`, :func:`fit_chosen_pca_whitening`). N centred
descriptors span at most N − 1 directions; plain PCA-whitening of all of them gives those N points identity
covariance in an (N − 1)-dimensional space, which forces them onto a regular simplex: every image scores
exactly −1/(N − 1) against every other and the collection's own structure is gone. The same happens
gradually whenever N is not much larger than D. The cure is shrinkage: each eigenvalue λ_i is replaced by
``(1 − ρ)·λ_i + ρ·mean(λ)`` (the Ledoit–Wolf form, a covariance shrunk towards ``mean(λ)·I``), so a
direction is whitened only in proportion to ``w_i = (1 − ρ)λ_i / ((1 − ρ)λ_i + ρ·mean(λ))``. The sum
``Σ w_i`` (:func:`whitened_directions`) is the effective number of equalised directions — the trace of the
in-sample hat matrix, as in ridge regression's effective degrees of freedom — and the simplex is the case
``Σ w_i = N − 1``. The default ρ is the smallest that keeps ``Σ w_i ≤ (N − 1) / 100``: at most one whitened
direction per hundred images. One per ten (the usual samples-per-parameter rule) lifted same-object groups
more but lowered Caltech-101 category groups by 3–13 mAP points at 600–2,250 images; one per hundred
lifted both at every size measured (benchmarks/RESULTS.md), and a whitening that makes a collection's own
groups harder to find is the failure this rule exists to prevent. So a few dozen photos are barely
whitened (little more than centring), and from ``N − 1 ≥ 100·D`` on ρ = 0: plain PCA-whitening, as in the
literature's large training sets. ρ is baked into the projection, so the file format is unchanged.
(Ledoit–Wolf's own ρ is tuned for the covariance, not its inverse: for N ≪ D it shrinks towards
``mean(λ) = tr(Σ)/D``, tiny next to the N − 1 non-zero eigenvalues, so the whitening stays close to the
simplex; on 13 sample photos it lowered the groups' mAP, while this rule kept it.)
"""

from __future__ import annotations

import logging
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from lookalike.atomic import atomic_write
from lookalike.errors import ConfigError, WhiteningError

log = logging.getLogger(__name__)

KINDS: Final = ("pca", "learned")
FORMAT_VERSION: Final = 1
DEFAULT_EIG_FLOOR: Final = 1e-6
MIN_PCA_SAMPLES: Final = 3
IMAGES_PER_DIRECTION: Final = 100.0  # default budget of a whitening fitted on the images it is applied to
NUMERICAL_ZERO: Final = 1e-9  # eigenvalues below this fraction of the largest are zero variance


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
    x: np.ndarray, dim: int | None = None, eig_floor: float = DEFAULT_EIG_FLOOR, shrinkage: float = 0.0
) -> Whitening:
    """PCA-whitening fitted on descriptors ``x`` ``(N, D)``, keeping ``dim`` components (default all ``D``).

    Centres on the mean, eigendecomposes the covariance ``Σ = Xcᵀ Xc / N``, and keeps the top ``dim``
    eigenvectors ``u_i`` scaled by ``1 / sqrt(λ'_i)``, with ``λ' = (1 − shrinkage)·λ + shrinkage·mean(λ)``
    (:func:`shrunk_eigenvalues`; ``shrinkage`` 0, the default, is plain PCA-whitening) raised to at least
    ``eig_floor · λ'_1`` (see the module docstring). Without shrinkage the whitened training descriptors
    have identity covariance. To whiten descriptors with the very data they are searched in, use
    :func:`fit_chosen_pca_whitening`, which chooses ``dim`` and ``shrinkage`` from the data.
    """
    x = _check_descriptors(x)
    dim = _check_options(dim, eig_floor, x.shape[1])
    _check_shrinkage(shrinkage)
    mean, values, vectors = _pca_spectrum(x)
    return _pca_whitening(mean, values, vectors, dim, shrinkage, eig_floor)


def _pca_spectrum(x: np.ndarray, thin: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, the ``D`` covariance eigenvalues (descending) and eigenvectors (columns) of ``x`` ``(N, D)``.

    ``thin`` with ``N ≤ D``: the eigenvectors come from the ``N × N`` Gram matrix of the centred data,
    ``u_i = Xcᵀ v_i / sqrt(N λ_i)``, and only those with a non-zero eigenvalue are returned (the other
    eigenvalues are zero). Same eigenvectors and sign rule, at ``O(N²D)`` instead of a ``D × D``
    eigendecomposition.
    """
    mean = x.mean(axis=0)
    centred = x - mean
    n, d = x.shape
    if not thin or n > d:
        values, vectors = _eig_descending(centred.T @ centred / n)
        return mean, values, vectors
    small, dual = _eig_descending(centred @ centred.T / n)
    kept = small > NUMERICAL_ZERO * max(float(small[0]), 0.0)
    vectors = centred.T @ dual[:, kept] / np.sqrt(n * small[kept])
    pivots = vectors[np.argmax(np.abs(vectors), axis=0), np.arange(vectors.shape[1])]
    values = np.zeros(d)
    values[: int(kept.sum())] = small[kept]
    return mean, values, vectors * np.where(pivots < 0, -1.0, 1.0)


def _pca_whitening(
    mean: np.ndarray, values: np.ndarray, vectors: np.ndarray, dim: int, shrinkage: float, eig_floor: float
) -> Whitening:
    values = _floored(shrunk_eigenvalues(values, shrinkage), eig_floor, "PCA-whitening", dim)
    projection = vectors[:, :dim].T / np.sqrt(values[:dim])[:, None]
    return Whitening(mean, projection, "pca")


def _check_shrinkage(shrinkage: float) -> None:
    if not 0.0 <= shrinkage <= 1.0:
        raise ConfigError(f"shrinkage must be in [0, 1], got {shrinkage}")


# ---- choosing a PCA-whitening for a collection's own descriptors ------------------------------------------


def shrunk_eigenvalues(values: np.ndarray, shrinkage: float) -> np.ndarray:
    """``(1 − ρ)·λ + ρ·mean(λ)`` for the eigenvalues ``values`` ``(D,)`` of a covariance (all ``D`` of them,
    zeros included: ``mean(λ) = tr(Σ) / D``), i.e. the eigenvalues of ``(1 − ρ)·Σ + ρ·mean(λ)·I``.

    ``ρ = 0`` returns ``values`` unchanged (the same floats); ``ρ = 1`` makes every eigenvalue ``mean(λ)``,
    so a whitening built on them is a rotation: centring and L2 normalisation are all that is left.
    """
    _check_shrinkage(shrinkage)
    values = np.asarray(values, dtype=np.float64)
    if shrinkage == 0.0:
        return values
    return (1.0 - shrinkage) * values + shrinkage * float(values.mean())


def _varying_directions(values: np.ndarray) -> int:
    """How many eigenvalues are above ``NUMERICAL_ZERO`` times the largest (0 if none is positive)."""
    top = float(values.max()) if values.size else 0.0
    return int(np.count_nonzero(values > NUMERICAL_ZERO * top)) if top > 0 else 0


def _direction_weights(values: np.ndarray, ratio: float) -> np.ndarray:
    """``λ_i / (λ_i + ratio·mean(λ))`` with ``ratio = ρ / (1 − ρ)``; numerically zero ``λ_i`` weigh 0."""
    values = np.asarray(values, dtype=np.float64)
    top = float(values.max()) if values.size else 0.0
    if not top > 0:
        return np.zeros_like(values)
    varies = values > NUMERICAL_ZERO * top
    ridge = ratio * float(values.mean())
    return np.where(varies, values / np.where(varies, values + ridge, 1.0), 0.0)


def whitened_directions(values: np.ndarray, shrinkage: float, dim: int | None = None) -> float:
    """``Σ_{i < dim} w_i`` with ``w_i = (1 − ρ)λ_i / ((1 − ρ)λ_i + ρ·mean(λ))``: how many directions a
    PCA-whitening with shrinkage ``ρ`` equalises, counting each kept direction by how fully it is whitened.

    ``values`` are all ``D`` eigenvalues, descending; ``dim`` (default all) how many directions are kept.
    For whitened training descriptors ``Y`` ``(N, dim)`` it is ``tr(Yᵀ Y) / N · (1 − ρ)``, the trace of the
    in-sample hat matrix ``Xc ((1 − ρ)Xcᵀ Xc + N ρ mean(λ) I)⁻¹ Xcᵀ (1 − ρ)``. Without shrinkage it is the
    number of kept directions the data varies in (eigenvalues above ``1e-9·λ_1``); ``N − 1`` of them for
    ``N ≤ D`` samples is the regular simplex of the module docstring.
    """
    _check_shrinkage(shrinkage)
    if shrinkage == 1.0:
        return 0.0
    return float(_direction_weights(values, shrinkage / (1.0 - shrinkage))[:dim].sum())


def shrinkage_for_directions(values: np.ndarray, target: float, dim: int | None = None) -> float:
    """The smallest shrinkage ``ρ`` with ``whitened_directions(values, ρ, dim) ≤ target`` (``target > 0``).

    0 when plain whitening already equalises no more than ``target`` directions. The count falls
    monotonically as ρ grows, so ``ρ / (1 − ρ)`` is found by bisection on a log scale, to a relative 1e-9.
    """
    if not target > 0:
        raise ConfigError(f"the number of whitened directions must be positive, got {target}")
    if whitened_directions(values, 0.0, dim) <= target:
        return 0.0
    values = np.asarray(values, dtype=np.float64)
    spread = float(values.max()) / float(values.mean())  # about one direction is whitened at ratio = spread
    low, high = 1e-12 * spread, 1e12 * spread
    for _ in range(200):
        middle = np.sqrt(low * high)
        if whitened_directions(values, middle / (1.0 + middle), dim) > target:
            low = middle
        else:
            high = middle
        if high / low < 1.0 + 1e-9:
            break
    return high / (1.0 + high)


@dataclass(frozen=True)
class PcaChoice:
    """How a PCA-whitening of ``samples`` descriptors of ``input_dim`` dimensions was chosen, and why.

    ``dim`` components are kept; ``shrinkage`` ρ replaces each eigenvalue λ by ``(1 − ρ)·λ + ρ·mean(λ)``;
    ``directions`` is :func:`whitened_directions` of the result; ``reason`` says why, in one sentence.
    """

    samples: int
    input_dim: int
    dim: int
    shrinkage: float
    directions: float
    reason: str

    def summary(self) -> str:
        """One line for a person, e.g. ``2048 → 32 (shrinkage 0.9993, 3.2 whitened directions), chosen …``."""
        return (
            f"{self.input_dim} → {self.dim} (shrinkage {self.shrinkage:.4g}, "
            f"{self.directions:.1f} whitened directions), chosen for {self.samples} images: {self.reason}"
        )


def choose_pca(
    values: np.ndarray,
    samples: int,
    dim: int | None = None,
    shrinkage: float | None = None,
    images_per_direction: float = IMAGES_PER_DIRECTION,
) -> PcaChoice:
    """The dimension and shrinkage of a PCA-whitening fitted on ``samples`` descriptors and applied to them.

    ``values`` are the ``D`` covariance eigenvalues, descending. The rules (see the module docstring):

    * at least :data:`MIN_PCA_SAMPLES` descriptors: two span one direction, and any whitening sends them
      to opposite points (score −1), so nothing is estimated; fewer raise :class:`WhiteningError`;
    * ``dim`` defaults to every direction the centred data varies in — ``min(D, N − 1)`` unless some
      images coincide; dropping the others changes no ranking among the collection's own images. A
      larger ``dim`` raises ``ConfigError``: the data say nothing about directions they do not vary in;
    * ``shrinkage`` defaults to the smallest ρ that whitens at most ``(N − 1) / images_per_direction``
      directions (:func:`shrinkage_for_directions`); 0 — plain PCA-whitening — once the kept
      directions are no more than that. A given ``shrinkage`` of 0 with ``dim = N − 1`` is refused
      (``ConfigError``): it is the regular simplex, every image at −1/(N − 1) from every other.
    """
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise WhiteningError(f"expected the (D,) eigenvalues of a covariance, got shape {values.shape}")
    if samples < MIN_PCA_SAMPLES:
        raise WhiteningError(
            f"PCA-whitening needs at least {MIN_PCA_SAMPLES} images, got {samples}: two images vary in one "
            "direction only, and any whitening of it puts them at opposite points"
        )
    if not images_per_direction > 0:
        raise ConfigError(f"images_per_direction must be positive, got {images_per_direction}")
    input_dim = values.size
    most = min(_varying_directions(values), samples - 1)
    if most == 0:
        raise WhiteningError("PCA-whitening: the descriptors do not vary; there is nothing to whiten")
    if dim is None:
        dim = most
    elif not 1 <= dim <= most:
        raise ConfigError(
            f"cannot keep {dim} whitened dimensions: {samples} images of {input_dim} dimensions vary in "
            f"{most} directions (at most N − 1 = {samples - 1}), so the dimension must be in 1..{most}"
        )
    budget = (samples - 1) / images_per_direction
    if shrinkage is None:
        shrinkage = shrinkage_for_directions(values, budget, dim)
        if shrinkage == 0.0:
            reason = (
                f"at least {images_per_direction:g} images per whitened direction, so plain PCA-whitening "
                "(no shrinkage)"
            )
        else:
            plain = whitened_directions(values, 0.0, dim)
            reason = (
                f"{samples} images can whiten about {budget:.2g} directions (one per {images_per_direction:g} "
                "images), so the eigenvalues are shrunk towards their mean; plain PCA-whitening would whiten "
                + (
                    f"all {dim} and score every image −1/{dim} against every other"
                    if dim == samples - 1 and plain == dim
                    else f"{plain:.0f}"
                )
            )
    else:
        _check_shrinkage(shrinkage)
        if shrinkage == 0.0 and dim == samples - 1:  # all N − 1 directions of the centred data, equalised
            raise ConfigError(
                f"plain PCA-whitening (shrinkage 0) of all {dim} directions of {samples} images maps them to "
                f"a regular simplex: every image would score −1/{dim} against every other; keep fewer "
                "dimensions or give a shrinkage above 0"
            )
        reason = f"shrinkage {shrinkage:g} as given; the default would whiten about {budget:.3g} directions"
    return PcaChoice(samples, input_dim, dim, shrinkage, whitened_directions(values, shrinkage, dim), reason)


def fit_chosen_pca_whitening(
    x: np.ndarray,
    dim: int | None = None,
    shrinkage: float | None = None,
    images_per_direction: float = IMAGES_PER_DIRECTION,
    eig_floor: float = DEFAULT_EIG_FLOOR,
) -> tuple[Whitening, PcaChoice]:
    """PCA-whitening of descriptors ``x`` ``(N, D)`` that will be searched among themselves, with the
    dimension and shrinkage :func:`choose_pca` picks (or checks, when given), and that choice."""
    x = _check_descriptors(x)
    _check_options(None, eig_floor, x.shape[1])
    mean, values, vectors = _pca_spectrum(x, thin=True)
    choice = choose_pca(values, x.shape[0], dim, shrinkage, images_per_direction)
    return _pca_whitening(mean, values, vectors, choice.dim, choice.shrinkage, eig_floor), choice


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
    with atomic_write(Path(path)) as handle:
        np.savez(
            handle,
            version=np.array(FORMAT_VERSION, dtype=np.int64),
            kind=np.array(whitening.kind),
            mean=whitening.mean,
            projection=whitening.projection,
        )


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
    "IMAGES_PER_DIRECTION",
    "KINDS",
    "MIN_PCA_SAMPLES",
    "PcaChoice",
    "Whitening",
    "choose_pca",
    "fit_chosen_pca_whitening",
    "fit_learned_whitening",
    "fit_pca_whitening",
    "load_whitening",
    "save_whitening",
    "shrinkage_for_directions",
    "shrunk_eigenvalues",
    "whitened_directions",
]
