"""Score descriptor variants (pooling × single/multi-scale × whitening) on a protocol from one extraction."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from lookalike.collection.fitting import same_class_pairs
from lookalike.errors import ConfigError
from lookalike.evaluate.extraction import PerScaleDescriptors, extract_variants, multiscale_power
from lookalike.evaluate.metrics import compute_map, revisited_protocol, ukbench_score
from lookalike.evaluate.protocols import EvalSet
from lookalike.extract import MULTI_SCALES, DescriptorSettings, Extractor
from lookalike.rerank import ArrayDatabase, Chain, parse_chain
from lookalike.whitening import Whitening, fit_learned_whitening, fit_pca_whitening

WHITENINGS = ("none", "pca", "learned")
KAPPAS = (1, 5, 10)


@dataclass(frozen=True)
class Variant:
    pooling: str = "gem"
    multiscale: bool = False
    whitening: str = "none"
    rerank: str | Chain = "none"  # a lookalike.rerank chain ("dba,aqe"), kept in its canonical spelling

    def __post_init__(self) -> None:
        if self.whitening not in WHITENINGS:
            raise ConfigError(f"whitening must be one of {', '.join(WHITENINGS)}, got {self.whitening!r}")
        try:
            canonical = str(parse_chain(self.rerank))
        except ConfigError as exc:
            raise ConfigError(f"rerank: {exc}") from None
        object.__setattr__(self, "rerank", canonical)

    @property
    def label(self) -> str:
        scales = "ms" if self.multiscale else "ss"
        label = f"{self.pooling}/{scales}/{self.whitening}"
        return label if self.rerank == "none" else f"{label}/{self.rerank}"


@dataclass(frozen=True)
class EvalResult:
    protocol: str
    model: str
    imsize: int
    variant: Variant
    map: float
    mp_at_k: dict[int, float]
    extract_ms_per_image: float
    queries: int
    database: int
    revisited: dict[str, dict] = field(default_factory=dict)
    ukbench_ns: float | None = None

    def as_dict(self) -> dict:
        record = asdict(self)
        record["variant"] = self.variant.label
        return record


Progress = Callable[[str, int, int], None]


@dataclass
class _Extracted:
    database: PerScaleDescriptors
    queries: PerScaleDescriptors | None
    train: PerScaleDescriptors | None


def variant_vectors(extracted: PerScaleDescriptors, variant: Variant, extractor: Extractor) -> np.ndarray:
    if variant.multiscale:
        return extracted.multi(variant.pooling, multiscale_power(variant.pooling, extractor))
    return extracted.single(variant.pooling)


def fit_variant_whitening(
    train: np.ndarray, labels: Sequence[str], kind: str, dim: int | None = None
) -> Whitening | None:
    if kind == "none":
        return None
    if len(train) < 2:
        raise ConfigError("whitening needs training images disjoint from the queries; this protocol has none")
    if kind == "pca":
        return fit_pca_whitening(train, dim=dim or min(train.shape[1], len(train) - 1))
    return fit_learned_whitening(train, same_class_pairs(list(labels)), dim=dim)


def ranked(
    queries: np.ndarray, database: np.ndarray, rerank: str | Chain = "none", own: np.ndarray | None = None
) -> np.ndarray:
    """Database rows ``(Q, N)`` per query, best first, after the chain ``rerank`` — the collection's
    search, made exact and as deep as the database. ``own`` holds each query's own database row (−1:
    none), which re-ranking never counts among that query's neighbours (DBA runs over the whole
    database, as offline)."""
    return parse_chain(rerank).search(ArrayDatabase(database), queries, len(database), own).ids


def score(evalset: EvalSet, ranks: np.ndarray) -> tuple[float, dict, dict, float | None]:
    """(mAP, mP@k, revisited E/M/H, UKBench N-S) of the rankings ``ranks`` (Q, N)."""
    if evalset.revisited:
        per_setting = revisited_protocol(ranks, evalset.gnd, KAPPAS)
        medium = per_setting["medium"]
        revisited = {s: {"map": r.map, "mp_at_k": r.mp_at_k} for s, r in per_setting.items()}
        return medium.map, medium.mp_at_k, revisited, None
    result = compute_map(ranks, evalset.gnd, KAPPAS)
    mp = {k: float(v) for k, v in zip(KAPPAS, result.mp_at_k, strict=True)}
    ns = ukbench_score(ranks, evalset.groups) if evalset.groups is not None else None
    return float(result.map), mp, {}, ns


def extract_all(
    evalset: EvalSet,
    extractor: Extractor,
    need_train: bool,
    progress: Progress | None,
) -> _Extracted:
    def reporter(stage: str) -> Callable[[int, int], None] | None:
        return (lambda done, total: progress(stage, done, total)) if progress else None

    database = extract_variants(extractor, evalset.images, progress=reporter("database"))
    queries = None
    if evalset.query_images:
        queries = extract_variants(
            extractor, evalset.query_images, evalset.query_bboxes, progress=reporter("queries")
        )
    train = extract_variants(extractor, evalset.train, progress=reporter("train")) if need_train else None
    return _Extracted(database, queries, train)


def evaluate(
    evalset: EvalSet,
    model: str,
    variants: Sequence[Variant],
    imsize: int = 1024,
    precision: str = "auto",
    scales: Sequence[float] = MULTI_SCALES,
    progress: Progress | None = None,
) -> list[EvalResult]:
    """Extract once (all poolings, all scales) and score every variant."""
    if 1.0 not in scales:
        raise ConfigError("evaluation scales must include 1 (the single-scale descriptor)")
    extractor = Extractor(
        DescriptorSettings(model=model, imsize=imsize, scales=tuple(scales), precision=precision)
    )
    need_train = any(v.whitening != "none" for v in variants)
    extracted = extract_all(evalset, extractor, need_train, progress)
    results = []
    for variant in variants:
        database = variant_vectors(extracted.database, variant, extractor)
        own_rows = None  # each query's own database row, kept out of its expansion
        if extracted.queries is not None:
            queries = variant_vectors(extracted.queries, variant, extractor)
        else:
            own_rows = np.asarray(evalset.query_ids)
            queries = database[own_rows]
        if extracted.train is not None and variant.whitening != "none":
            whitening = fit_variant_whitening(
                variant_vectors(extracted.train, variant, extractor), evalset.train_labels, variant.whitening
            )
            if whitening is not None:
                database, queries = whitening.apply(database), whitening.apply(queries)
        mean_map, mp, revisited, ns = score(evalset, ranked(queries, database, variant.rerank, own_rows))
        seconds = extracted.database.seconds(variant.pooling, variant.multiscale)
        results.append(
            EvalResult(
                protocol=evalset.name,
                model=model,
                imsize=imsize,
                variant=variant,
                map=mean_map,
                mp_at_k=mp,
                extract_ms_per_image=1000 * seconds,
                queries=evalset.query_count,
                database=len(evalset.images),
                revisited=revisited,
                ukbench_ns=ns,
            )
        )
    return results


def all_variants(whitenings: Sequence[str] = WHITENINGS, multiscale: bool = True) -> list[Variant]:
    """Every pooling × single (and, with ``multiscale``, multi) scale × whitening."""
    return [
        Variant(pooling, multi, whitening)
        for pooling in ("mac", "spoc", "rmac", "gem")
        for multi in ((False, True) if multiscale else (False,))
        for whitening in whitenings
    ]
