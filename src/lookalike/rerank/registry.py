"""The one registry of re-rankers, and chains of them written as text.

A chain is stages separated by commas, each a registered name with optional ``key=value`` options after a
colon; the options of a stage run up to the next name::

    none                    no re-ranking (also the empty string)
    aqe                     αQE with its default options
    dba,aqe                 DBA, then αQE on the augmented database
    dba,aqe:alpha=3,n=5     the same, αQE with α = 3 and 5 neighbours
    dba+aqe                 ``+`` between stages is accepted as a comma (the older spelling)

Names and keys are case-insensitive; values are converted to the option's type and checked by the stage.
Anything else — an unknown name or option, a bad value, a stray comma — is a :class:`ConfigError` that
says what exists.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, TypeVar, get_type_hints

import numpy as np

from lookalike.errors import ConfigError
from lookalike.rerank.base import Database, Ranking, Reranker, as_matrix

if TYPE_CHECKING:
    from PIL import Image

NONE: Final = "none"
MAX_STAGES: Final = 8
_NAME = re.compile(r"[a-z][a-z0-9_-]*")
_STAGE_PLUS = re.compile(r"\+(?=\s*[A-Za-z])")  # "dba+aqe"; not the "+" of "1e+3"


@dataclass(frozen=True)
class RerankerSpec:
    """A registered re-ranker: its name, the dataclass that is both its options and its behaviour, and one
    line saying what it does."""

    name: str
    factory: type
    summary: str

    def options(self) -> dict[str, tuple[type, Any]]:
        """Option name → (type, default), in declaration order."""
        hints = get_type_hints(self.factory)
        return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(self.factory) if f.init}

    def usage(self) -> str:
        """``aqe:n=2,alpha=3.0`` — the stage spelled with every option at its default."""
        defaults = ",".join(f"{key}={_text(default)}" for key, (_, default) in self.options().items())
        return f"{self.name}:{defaults}" if defaults else self.name

    def build(self, **options: Any) -> Reranker:
        return self.factory(**options)


_REGISTRY: dict[str, RerankerSpec] = {}
_BY_TYPE: dict[type, RerankerSpec] = {}

R = TypeVar("R", bound=type)


def register(name: str, summary: str) -> Callable[[R], R]:
    """Class decorator: register a frozen dataclass with ``depth(k)`` and ``rerank(ranking)`` under ``name``;
    its init fields (int, float, bool or str, each with a default) are the stage's options."""

    def add(factory: R) -> R:
        if not _NAME.fullmatch(name) or name == NONE:
            raise ConfigError(f"a re-ranker name is lower-case letters, digits, - and _; got {name!r}")
        if name in _REGISTRY:
            raise ConfigError(f"a re-ranker named {name!r} is already registered")
        if not dataclasses.is_dataclass(factory):
            raise ConfigError(f"re-ranker {name!r} must be a dataclass (its fields are its options)")
        spec = RerankerSpec(name, factory, summary)
        for key, (kind, default) in spec.options().items():
            if kind not in (int, float, bool, str) or default is dataclasses.MISSING:
                raise ConfigError(
                    f"option {key!r} of {name!r} needs a default of type int, float, bool or str"
                )
        _REGISTRY[name] = spec
        _BY_TYPE[factory] = spec
        return factory

    return add


def reranker_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def reranker_spec(name: str) -> RerankerSpec:
    spec = _REGISTRY.get(name.lower())
    if spec is None:
        known = ", ".join(spec.usage() for spec in _REGISTRY.values())
        raise ConfigError(f"unknown re-ranker {name!r}; the registered ones are {known} (or {NONE})")
    return spec


def registry_help() -> str:
    """One sentence per registered re-ranker, for help texts and the API schema."""
    return " ".join(f"{spec.name} ({_defaults(spec)}): {spec.summary}." for spec in _REGISTRY.values())


def _defaults(spec: RerankerSpec) -> str:
    return (
        ", ".join(f"{key}={_text(default)}" for key, (_, default) in spec.options().items()) or "no options"
    )


@dataclass(frozen=True)
class Chain:
    """Re-rankers applied left to right; itself a re-ranker. The empty chain is ``none``."""

    stages: tuple[Reranker, ...] = ()

    def __str__(self) -> str:
        return ",".join(_stage_text(stage) for stage in self.stages) or NONE

    def __bool__(self) -> bool:
        return bool(self.stages)

    def depth(self, k: int) -> int:
        return max([k, *(stage.depth(k) for stage in self.stages)])

    @property
    def needs_pixels(self) -> bool:
        """Whether a stage matches the query's pixels (spatial verification): a caller that has only
        a file name reads the image for it."""
        return any(getattr(stage, "needs_pixels", False) for stage in self.stages)

    def rerank(self, ranking: Ranking) -> Ranking:
        for stage in self.stages:
            ranking = stage.rerank(ranking)
        return ranking

    def search(
        self,
        database: Database,
        queries: np.ndarray,
        k: int,
        own: np.ndarray | None = None,
        pixels: Sequence[Image.Image | None] = (),
    ) -> Ranking:
        """The top ``k`` of ``queries`` (Q, D) in ``database`` after every stage: a first search as deep
        as the stages need, the stages in order, then the best ``k``. ``own``: each query's database id,
        ``-1`` (or None for all) when it is not in the database; ``pixels``: each query's image, where
        there is one (spatial verification matches it)."""
        if k < 1:
            raise ConfigError(f"k must be at least 1, got {k}")
        queries = as_matrix(queries, "queries")
        own = np.full(len(queries), -1, np.int64) if own is None else np.asarray(own, np.int64)
        if own.shape != (len(queries),):
            raise ConfigError(f"need one own id per query ({len(queries)}), got shape {own.shape}")
        scores, ids = database.search(queries, self.depth(k))
        return self.rerank(Ranking(queries, scores, ids, database, own, tuple(pixels))).top(k)


def parse_chain(text: str | Chain | None) -> Chain:
    """The :class:`Chain` that ``text`` spells (see the module docstring); a Chain is returned as it is."""
    if isinstance(text, Chain):
        return text
    if text is None:
        return Chain()
    if not isinstance(text, str):
        raise ConfigError(f"a re-ranking chain is text such as 'dba,aqe', got {type(text).__name__}")
    words = _STAGE_PLUS.sub(",", text).strip()
    if words.lower() in ("", NONE):
        return Chain()
    stages = [_build(name, options) for name, options in _stages(words, text)]
    if len(stages) > MAX_STAGES:
        raise ConfigError(f"a re-ranking chain has at most {MAX_STAGES} stages, got {len(stages)}")
    return Chain(tuple(stages))


def _stages(words: str, text: str) -> Iterator[tuple[str, list[str]]]:
    name: str | None = None
    options: list[str] = []
    for raw in words.split(","):
        token = raw.strip()
        if not token:
            raise ConfigError(f"empty stage in re-ranking chain {text!r} (stages are separated by one comma)")
        if "=" in token.partition(":")[0]:  # key=value: an option of the stage before
            if name is None:
                raise ConfigError(f"option {token!r} comes before any re-ranker in {text!r}")
            options.append(token)
            continue
        if name is not None:
            yield name, options
        name, _, first = token.partition(":")
        name = name.strip().lower()
        if name == NONE:
            raise ConfigError(f"{NONE!r} stands alone: it cannot be a stage of {text!r}")
        options = [first] if ":" in token else []
    assert name is not None
    yield name, options


def _build(name: str, tokens: list[str]) -> Reranker:
    spec = reranker_spec(name)
    declared = spec.options()
    values: dict[str, Any] = {}
    for token in tokens:
        key, equals, value = (part.strip() for part in token.partition("="))
        key = key.lower()
        if not equals or not key or not value:
            raise ConfigError(f"{name}: options are key=value, got {token.strip()!r}")
        if key not in declared:
            raise ConfigError(f"{name} has no option {key!r}; it takes {spec.usage()} (the defaults)")
        if key in values:
            raise ConfigError(f"{name}: option {key!r} is given twice")
        values[key] = _convert(name, key, value, declared[key][0])
    return spec.build(**values)


def _convert(name: str, key: str, value: str, kind: type) -> Any:
    expected = {bool: "true or false", int: "an integer", float: "a finite number"}
    try:
        if kind is bool:
            flag = {"true": True, "yes": True, "1": True, "false": False, "no": False, "0": False}
            return flag[value.lower()]
        if kind is int:
            return int(value)
        if kind is float:
            number = float(value)
            if not math.isfinite(number):
                raise ValueError
            return number
        return value
    except (KeyError, ValueError):
        raise ConfigError(f"{name}: {key} must be {expected[kind]}, got {value!r}") from None


def _stage_text(stage: Reranker) -> str:
    spec = _BY_TYPE.get(type(stage))
    if spec is None:
        raise ConfigError(f"{type(stage).__name__} is not a registered re-ranker")
    changed = [
        f"{key}={_text(getattr(stage, key))}"
        for key, (_, default) in spec.options().items()
        if getattr(stage, key) != default
    ]
    return f"{spec.name}:{','.join(changed)}" if changed else spec.name


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return repr(value) if isinstance(value, float) else str(value)
