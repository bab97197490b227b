"""Re-ranking: one :class:`Reranker` interface, one registry, chains of stages written as text.

Collection search, ``lookalike search --rerank``, ``lookalike evaluate --rerank``, the web API's ``rerank``
field and evaluation all read this registry (``dba,aqe``, ``aqe:n=5``; see :mod:`lookalike.rerank.registry`
for the syntax). A search runs as :meth:`Chain.search`: one first search as deep as the stages ask, then
each stage turns the :class:`Ranking` (queries, shortlist, database) into a better one, left to right.

**Adding a re-ranker.** A frozen dataclass whose fields (int, float, bool or str, with defaults) are its
options, with ``depth(k)`` (how long a shortlist it needs) and ``rerank(ranking) -> Ranking``, decorated
with :func:`register`. What it needs of the database beyond vectors and search (a kNN graph for
diffusion, local features for spatial verification) it asks of ``ranking.database`` through a protocol of
its own, and refuses with a :class:`ConfigError` a database that has none.

**A query never expands with itself.** When a query *is* an entry of the database — an indexed image
searched by id or by its unchanged file, or in evaluation a database image used as a query — αQE skips
that entry (``Ranking.own``), exactly as DBA skips each database vector's own row. Reasons: the
expansion formula already counts the query once, with weight 1; counting its database copy too would
weigh it twice and spend one of the ``n`` neighbour slots on it, so that ``n = 2`` would mean two
neighbours for a new photo but one for an indexed one. It is also the rule the published figures were
measured with (``benchmarks/RESULTS.md``, Caltech-101: DBA + αQE 77.46 → 81.73 mAP), so they stand.
Until this package, collection search counted an indexed query among its own neighbours. Measured on
the published protocol (Caltech-101 heldout, EfficientNet-Lite0 R-MAC), counting it scores αQE 78.09 and
DBA + αQE 81.31 mAP against 79.33 and 81.73 with it skipped; the UKBench sample is too small to tell
(100.0 either way, ResNet-50 at 256 px and EfficientNet-Lite0 at 128 px). An uploaded photo has no
identity: if the same picture is also indexed, that copy is a neighbour like any other.
"""

from __future__ import annotations

from lookalike.rerank.base import (
    ArrayDatabase,
    Database,
    LocalFeatureSource,
    Ranking,
    Reranker,
    exact_search,
)

# Importing the stage modules registers the built-in stages: aqe, dba, sv.
from lookalike.rerank.expansion import (
    DEFAULT_ALPHA,
    DEFAULT_N,
    AlphaQueryExpansion,
    AugmentedSource,
    DatabaseSideAugmentation,
    alpha_query_expansion,
    database_side_augmentation,
    expand_with,
)
from lookalike.rerank.registry import (
    MAX_STAGES,
    NONE,
    Chain,
    RerankerSpec,
    parse_chain,
    register,
    registry_help,
    reranker_names,
    reranker_spec,
)
from lookalike.rerank.spatial import SpatialVerification, verified_scores, verify_pair

# isort: split
# diffusion registers after the stages above, so that the registry lists it last.
from lookalike.rerank.diffusion import (
    AffinityGraph,
    Diffusion,
    GraphSource,
    affinity_graph,
    conjugate_gradient,
    diffuse,
    knn_graph,
)

__all__ = [
    "DEFAULT_ALPHA",
    "DEFAULT_N",
    "MAX_STAGES",
    "NONE",
    "AffinityGraph",
    "AlphaQueryExpansion",
    "ArrayDatabase",
    "AugmentedSource",
    "Chain",
    "Database",
    "DatabaseSideAugmentation",
    "Diffusion",
    "GraphSource",
    "LocalFeatureSource",
    "Ranking",
    "Reranker",
    "RerankerSpec",
    "SpatialVerification",
    "affinity_graph",
    "alpha_query_expansion",
    "conjugate_gradient",
    "database_side_augmentation",
    "diffuse",
    "exact_search",
    "expand_with",
    "knn_graph",
    "parse_chain",
    "register",
    "registry_help",
    "reranker_names",
    "reranker_spec",
    "verified_scores",
    "verify_pair",
]
