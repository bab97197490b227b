"""Global pooling of CNN feature maps: MAC, SPoC, R-MAC and GeM.

Every function maps feature maps ``(N, C, H, W)`` to descriptors ``(N, C)``. Results are *not* L2-normalised;
that happens once, in extraction, after pooling (and after whitening). Half-precision input (float16,
bfloat16) is computed and returned in float32; float32 and float64 input keep their dtype.

The modules are thin wrappers that hold the options (and GeM's ``p``) so that a descriptor model is an
ordinary ``nn.Module``. ``GeM`` keeps ``p`` under the state-dict key ``p`` with shape ``(1,)``, as cirtorch
does, so a cirtorch checkpoint's ``pool.p`` loads unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from types import MappingProxyType

import torch
from torch import Tensor, nn

from lookalike.errors import ConfigError

# Candidate numbers of regions along the long side at the coarsest R-MAC level (Tolias et al.).
_RMAC_STEPS = (2, 3, 4, 5, 6, 7)
_RMAC_OVERLAP = (2, 5)  # the desired overlap of neighbouring regions, 0.4, as an exact fraction


def _check_maps(x: Tensor) -> None:
    if x.dim() != 4:
        raise ConfigError(f"pooling expects feature maps of shape (N, C, H, W), got shape {tuple(x.shape)}")
    if x.shape[-2] == 0 or x.shape[-1] == 0:
        raise ConfigError(f"pooling needs a non-empty spatial grid, got shape {tuple(x.shape)}")


def _working(x: Tensor) -> Tensor:
    """``x`` in the precision pooling computes in: float32 for half types, unchanged otherwise."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _l2n(v: Tensor, eps: float) -> Tensor:
    return v / (torch.linalg.vector_norm(v, dim=-1, keepdim=True) + eps)


def mac(x: Tensor) -> Tensor:
    """Maximum activation of convolutions: the per-channel maximum over all spatial positions."""
    _check_maps(x)
    return _working(x.amax(dim=(-2, -1)))


def centre_prior_weights(
    height: int, width: int, sigma: float | None = None, device: torch.device | None = None
) -> Tensor:
    """SPoC's Gaussian centre prior over an ``height × width`` grid, as float32 weights summing to one.

    The Gaussian is centred on the middle of the grid (between cells when a side is even). ``sigma`` is in
    grid cells; by default it is a third of the distance from the centre to the closest boundary,
    ``min(height, width) / 6``, as in Babenko & Lempitsky (ICCV 2015).
    """
    if sigma is None:
        sigma = min(height, width) / 6.0
    if not sigma > 0:
        raise ConfigError(f"the centre prior's sigma must be positive, got {sigma}")
    ys = torch.arange(height, dtype=torch.float32, device=device) - (height - 1) / 2.0
    xs = torch.arange(width, dtype=torch.float32, device=device) - (width - 1) / 2.0
    weights = torch.exp(-(ys[:, None] ** 2 + xs[None, :] ** 2) / (2.0 * sigma**2))
    return weights / weights.sum()


def spoc(x: Tensor, centre_prior: bool = False, sigma: float | None = None) -> Tensor:
    """Sum-pooling of convolutions (Babenko & Lempitsky), computed as a (weighted) *mean*.

    Without the centre prior this is the per-channel mean over positions; with it, the average weighted by
    :func:`centre_prior_weights` (``sigma`` in grid cells). Babenko & Lempitsky sum instead of averaging; the two
    differ by a positive factor per image, which the later L2 normalisation removes. The mean keeps
    magnitudes independent of the map size and equals GeM with ``p = 1``.
    """
    _check_maps(x)
    if not centre_prior:
        if sigma is not None:
            raise ConfigError("sigma only applies to SPoC with the centre prior")
        return _working(x).mean(dim=(-2, -1))
    weights = centre_prior_weights(x.shape[-2], x.shape[-1], sigma, x.device)
    return (_working(x) * weights).sum(dim=(-2, -1))


def gem(x: Tensor, p: float | Tensor = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised-mean pooling (Radenović et al.): ``mean(clamp(x, min=eps) ** p) ** (1 / p)`` per channel.

    ``p = 1`` is average pooling and ``p → ∞`` tends to max pooling. ``p`` is a number or a tensor of shape
    ``()`` or ``(1,)`` (a learnable parameter); the powers are computed in at least float32.
    """
    _check_maps(x)
    if isinstance(p, Tensor):
        p = _working(p)
    elif not p > 0:
        raise ConfigError(f"GeM needs p > 0, got {p}")
    return _working(x).clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def _long_side_extra(height: int, width: int) -> int:
    """How many more regions the long side gets than the short side, at every level.

    At the coarsest level regions are ``w = min(H, W)`` wide and the long side ``M`` gets ``s`` of them,
    ``s`` in 2..7, spaced ``(M - w) / (s - 1)`` apart; ``s`` is chosen so that neighbours overlap by as
    close to 40 % as possible, overlap = ``1 - (M - w) / ((s - 1) w)``. Compared in exact integer
    arithmetic; an exact tie goes to the smaller ``s``.
    """
    short, long = min(height, width), max(height, width)
    if short == long:
        return 0
    num, den = _RMAC_OVERLAP
    best_s, best = 0, (0, 1)
    for s in _RMAC_STEPS:
        # |overlap - num/den| as the fraction dist / scale
        dist = abs((den - num) * (s - 1) * short - den * (long - short))
        scale = den * (s - 1) * short
        if best_s == 0 or dist * best[1] < best[0] * scale:
            best_s, best = s, (dist, scale)
    return best_s - 1


def _region_starts(length: int, size: int, count: int) -> list[int]:
    """Offsets of ``count`` windows of ``size`` spread uniformly over ``length``, first at 0, last at the end."""
    if count == 1:
        return [0]
    return [(k * (length - size)) // (count - 1) for k in range(count)]


def rmac_regions(height: int, width: int, levels: int = 3) -> list[tuple[int, int, int, int]]:
    """The R-MAC regions of a ``height × width`` feature map, as ``(top, left, height, width)`` tuples.

    The rule of Tolias, Sicre & Jégou (ICLR 2016), as in their code and cirtorch: at level ``l = 1..levels``
    the regions are squares of side ``floor(2 min(H, W) / (l + 1))``; the short side holds ``l`` of them and
    the long side ``l + e``, where ``e`` (the same at every level) makes the coarsest level's regions along
    the long side overlap by as close to 40 % as possible (see ``_long_side_extra``). Along each side the
    regions are spread uniformly, offset ``k`` at ``floor(k (side - size) / (count - 1))``, so the first
    touches the start and the last the end. Regions of side 0 (tiny maps, deep levels) are dropped.
    Ordered by level, then row, then column. The whole map is not included; :func:`rmac` adds it.

    Everything is computed in exact integer arithmetic. The floating-point versions (the authors' MATLAB
    code, cirtorch's float32) agree except at exact ties of the 40 % rule, which rounding breaks either way
    (on a 12 × 44 map 5 and 6 regions overlap by 1/3 and 7/15; we take 5, cirtorch 6), and where rounding
    puts an integer offset just below itself (on a 2 × 32 map cirtorch's level-2 regions stop a cell
    short of the right edge). 32 of the 4096 sizes up to 64 × 64 differ from cirtorch.
    """
    if levels < 1:
        raise ConfigError(f"R-MAC needs at least one level, got {levels}")
    if height < 1 or width < 1:
        raise ConfigError(f"R-MAC needs a non-empty map, got {height} × {width}")
    short = min(height, width)
    extra = _long_side_extra(height, width)
    extra_h, extra_w = (extra, 0) if height > width else (0, extra)
    regions: list[tuple[int, int, int, int]] = []
    for level in range(1, levels + 1):
        size = (2 * short) // (level + 1)
        if size == 0:
            continue
        tops = _region_starts(height, size, level + extra_h)
        lefts = _region_starts(width, size, level + extra_w)
        regions.extend((top, left, size, size) for top in tops for left in lefts)
    return regions


def rmac(x: Tensor, levels: int = 3, eps: float = 1e-6, include_global: bool = True) -> Tensor:
    """Regional MAC (Tolias et al.): the sum of the L2-normalised MACs of the :func:`rmac_regions`.

    With ``include_global`` (the default, as in cirtorch) the L2-normalised MAC of the whole map is added
    too, so on a square map, whose first region is the whole map, that vector counts twice. The paper and
    the authors' code use only the regions, which ``include_global=False`` gives. The paper also
    PCA-whitens each region vector before summing; here whitening is applied to the pooled descriptor, as
    cirtorch's R-MAC layer does. L2 normalisation divides by ``norm + eps``.
    """
    _check_maps(x)
    regions = rmac_regions(x.shape[-2], x.shape[-1], levels)
    pooled = [x.amax(dim=(-2, -1))] if include_global else []
    pooled += [x[..., t : t + h, s : s + w].amax(dim=(-2, -1)) for t, s, h, w in regions]
    vectors = _working(torch.stack(pooled, dim=1))  # (N, R, C)
    return _l2n(vectors, eps).sum(dim=1)


class MAC(nn.Module):
    """:func:`mac` as a module."""

    def forward(self, x: Tensor) -> Tensor:
        return mac(x)


class SPoC(nn.Module):
    """:func:`spoc` as a module; ``centre_prior`` and ``sigma`` are fixed at construction."""

    def __init__(self, centre_prior: bool = False, sigma: float | None = None) -> None:
        super().__init__()
        if sigma is not None and not centre_prior:
            raise ConfigError("sigma only applies to SPoC with the centre prior")
        if sigma is not None and not sigma > 0:
            raise ConfigError(f"the centre prior's sigma must be positive, got {sigma}")
        self.centre_prior = centre_prior
        self.sigma = sigma

    def forward(self, x: Tensor) -> Tensor:
        return spoc(x, centre_prior=self.centre_prior, sigma=self.sigma)

    def extra_repr(self) -> str:
        if not self.centre_prior:
            return ""
        return "centre_prior=True" + ("" if self.sigma is None else f", sigma={self.sigma}")


class RMAC(nn.Module):
    """:func:`rmac` as a module."""

    def __init__(self, levels: int = 3, eps: float = 1e-6, include_global: bool = True) -> None:
        super().__init__()
        if levels < 1:
            raise ConfigError(f"R-MAC needs at least one level, got {levels}")
        self.levels = levels
        self.eps = eps
        self.include_global = include_global

    def forward(self, x: Tensor) -> Tensor:
        return rmac(x, levels=self.levels, eps=self.eps, include_global=self.include_global)

    def extra_repr(self) -> str:
        return f"levels={self.levels}, include_global={self.include_global}"


class GeM(nn.Module):
    """:func:`gem` as a module holding ``p`` (shape ``(1,)``): a parameter if ``learnable``, else a buffer.

    Either way ``p`` is in the state dict under ``p``, so checkpoints load into both kinds.
    """

    p: Tensor

    def __init__(self, p: float = 3.0, eps: float = 1e-6, learnable: bool = True) -> None:
        super().__init__()
        if not p > 0:
            raise ConfigError(f"GeM needs p > 0, got {p}")
        initial = torch.full((1,), float(p))
        if learnable:
            self.p = nn.Parameter(initial)
        else:
            self.register_buffer("p", initial)
        self.eps = eps

    @property
    def learnable(self) -> bool:
        return isinstance(self.p, nn.Parameter)

    def forward(self, x: Tensor) -> Tensor:
        return gem(x, p=self.p, eps=self.eps)

    def extra_repr(self) -> str:
        return f"p={self.p.detach().float().item():.4f}, eps={self.eps}, learnable={self.learnable}"


# Each pooling's factory; _OPTIONS lists the options build_pooling may pass to it.
POOLINGS: Mapping[str, Callable[..., nn.Module]] = MappingProxyType(
    {
        "mac": MAC,
        "spoc": SPoC,
        "spoc-centre": partial(SPoC, centre_prior=True),
        "rmac": RMAC,
        "gem": GeM,
    }
)
_OPTIONS: Mapping[str, frozenset[str]] = MappingProxyType(
    {
        "mac": frozenset(),
        "spoc": frozenset(),
        "spoc-centre": frozenset({"sigma"}),
        "rmac": frozenset({"levels", "include_global"}),
        "gem": frozenset({"p", "learnable"}),
    }
)


def gem_power(pool: nn.Module) -> float | None:
    """The exponent p of a GeM module (learned or fixed), None for other poolings."""
    if isinstance(pool, GeM):
        return float(pool.p.detach().reshape(-1)[0])
    return None


def build_pooling(
    name: str,
    *,
    p: float | None = None,
    learnable: bool | None = None,
    levels: int | None = None,
    include_global: bool | None = None,
    sigma: float | None = None,
) -> nn.Module:
    """The pooling module called ``name`` (a key of :data:`POOLINGS`), with the options given.

    Options left as ``None`` keep the module's default; giving one the pooling does not take (``p`` for
    ``"mac"``, say) is a :class:`ConfigError`, as is an unknown name.
    """
    factory = POOLINGS.get(name)
    if factory is None:
        raise ConfigError(f"unknown pooling {name!r}; known: {', '.join(POOLINGS)}")
    given = {
        "p": p,
        "learnable": learnable,
        "levels": levels,
        "include_global": include_global,
        "sigma": sigma,
    }
    given = {key: value for key, value in given.items() if value is not None}
    unused = sorted(set(given) - _OPTIONS[name])
    if unused:
        raise ConfigError(f"pooling {name!r} does not take {', '.join(unused)}")
    return factory(**given)


__all__ = [
    "MAC",
    "POOLINGS",
    "RMAC",
    "GeM",
    "SPoC",
    "build_pooling",
    "centre_prior_weights",
    "gem",
    "gem_power",
    "mac",
    "rmac",
    "rmac_regions",
    "spoc",
]
