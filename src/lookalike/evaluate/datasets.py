"""Retrieval ground truths (labelled folders are read by :mod:`lookalike.labels`).

Retrieval benchmarks are all read into one shape, :class:`GroundTruth`: revisitop's ``imlist`` / ``qimlist`` /
``gnd`` triple, where ``gnd`` holds one dict per query of database-id arrays (``'ok'`` and ``'junk'``, or the
revisited ``'easy'`` / ``'hard'`` / ``'junk'``) that :mod:`lookalike.evaluate.metrics` takes as it is.

* revisitop ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` — :func:`load_revisitop_gnd`, through an unpickler
  that admits numpy arrays and plain containers only; the same content as JSON — :func:`load_gnd_json`,
  :func:`save_gnd_json`;
* the original Oxford 5k / Paris 6k text files — :func:`load_oxford_text_gnd`;
* INRIA Holidays and UKBench, whose ground truth follows from the file names — :func:`holidays_groups`,
  :func:`ukbench_groups`.
"""

from __future__ import annotations

import codecs
import io
import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lookalike.atomic import atomic_write
from lookalike.errors import DatasetError

__all__ = [
    "GroundTruth",
    "holidays_groups",
    "load_gnd_json",
    "load_oxford_text_gnd",
    "load_revisitop_gnd",
    "save_gnd_json",
    "ukbench_groups",
]

# ---- retrieval ground truth ------------------------------------------------------------------------------

_ID_KEYS = ("ok", "easy", "hard", "junk")


@dataclass(frozen=True, eq=False)
class GroundTruth:
    """A retrieval benchmark: database images, query images, and per query the ids that count.

    ``images`` is revisitop's ``imlist`` (database id = position), ``queries`` its ``qimlist``; ``gnd[q]`` maps
    some of ``'ok'``, ``'easy'``, ``'hard'``, ``'junk'`` to int64 arrays of database ids and may hold
    ``'bbx'``, the query's box ``(x1, y1, x2, y2)`` as float64 (4,). ``query_names`` optionally names the
    queries (e.g. Oxford's ``all_souls_1``).
    """

    images: tuple[str, ...]
    queries: tuple[str, ...]
    gnd: tuple[dict[str, np.ndarray], ...]
    query_names: tuple[str, ...] = ()


def _names(value: Any, what: str, source: str) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, Sequence | np.ndarray):
        raise DatasetError(f"{source}: {what} must be a list of names")
    names = tuple(value)
    if not all(isinstance(name, str) for name in names):
        raise DatasetError(f"{source}: {what} must hold strings only")
    return names


def _id_array(value: Any, n_images: int, where: str) -> np.ndarray:
    array = np.asarray(value)
    if array.size == 0:
        return np.empty(0, np.int64)
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise DatasetError(f"{where} must be a list of integer ids, got {array.dtype} of shape {array.shape}")
    array = array.astype(np.int64)
    if array.min() < 0 or array.max() >= n_images:
        raise DatasetError(f"{where} holds ids outside the {n_images} database images")
    return array


def _query_truth(entry: Any, n_images: int, where: str) -> dict[str, np.ndarray]:
    if not isinstance(entry, Mapping):
        raise DatasetError(f"{where} must be a dict")
    truth = {key: _id_array(entry[key], n_images, f"{where}[{key!r}]") for key in _ID_KEYS if key in entry}
    if not truth:
        raise DatasetError(f"{where} has none of {_ID_KEYS}")
    if entry.get("bbx") is not None:
        try:
            box = np.asarray(entry["bbx"], dtype=np.float64)
        except (TypeError, ValueError):
            box = np.empty(0)
        if box.shape != (4,):
            raise DatasetError(f"{where}['bbx'] must be 4 numbers (x1, y1, x2, y2)")
        truth["bbx"] = box
    return truth


def _ground_truth(data: Any, source: str) -> GroundTruth:
    """Check a revisitop-shaped mapping and normalise it; unknown keys are dropped."""
    if not isinstance(data, Mapping) or not {"imlist", "qimlist", "gnd"} <= set(data):
        raise DatasetError(f"{source}: expected a dict with 'imlist', 'qimlist' and 'gnd'")
    images = _names(data["imlist"], "imlist", source)
    queries = _names(data["qimlist"], "qimlist", source)
    entries = data["gnd"]
    if not isinstance(entries, Sequence) or len(entries) != len(queries):
        raise DatasetError(f"{source}: 'gnd' must be a list with one entry per query ({len(queries)})")
    gnd = tuple(_query_truth(entry, len(images), f"{source}: gnd[{q}]") for q, entry in enumerate(entries))
    query_names = _names(data.get("query_names", ()), "query_names", source)
    if query_names and len(query_names) != len(queries):
        raise DatasetError(f"{source}: query_names must name every query")
    return GroundTruth(images, queries, gnd, query_names)


def _numpy_globals() -> dict[tuple[str, str], Any]:
    """The globals a pickle of numpy arrays and scalars names, under numpy 1.x and 2.x module paths."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 1.26
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,  # protocols 0–2 spell bytes as _codecs.encode(str, 'latin1')
    }
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # type: ignore[attr-defined]
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; any other global is refused, not imported."""

    _allowed = _numpy_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise DatasetError(f"pickle refers to {module}.{name}, which is not allowed") from None


def load_revisitop_gnd(path: str | Path) -> GroundTruth:
    """Read revisitop's ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` without running code from the file.

    The pickle must be a dict with ``'imlist'`` and ``'qimlist'`` (image names without extension) and
    ``'gnd'`` (per query ``'bbx'``, ``'easy'``, ``'hard'``, ``'junk'``). The unpickler resolves only numpy's
    array, dtype and scalar reconstructors (under ``numpy.core`` and ``numpy._core``) and ``_codecs.encode``;
    a pickle naming anything else — ``os.system``, a class of its own — raises ``DatasetError`` before that
    object is created. Ids are checked against the database size.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    try:
        data = _RestrictedUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except DatasetError as error:
        raise DatasetError(f"{path}: {error}") from None
    except Exception as error:  # a broken pickle can raise nearly anything
        raise DatasetError(f"{path}: not a readable pickle ({type(error).__name__}: {error})") from None
    return _ground_truth(data, str(path))


JSON_FORMAT = "lookalike.gnd"
JSON_VERSION = 1


def save_gnd_json(truth: GroundTruth, path: str | Path) -> None:
    """Write ``truth`` as UTF-8 JSON, atomically: revisitop's dict with plain lists, plus format and version."""
    document = {
        "format": JSON_FORMAT,
        "version": JSON_VERSION,
        "imlist": list(truth.images),
        "qimlist": list(truth.queries),
        "query_names": list(truth.query_names),
        "gnd": [{key: value.tolist() for key, value in entry.items()} for entry in truth.gnd],
    }
    with atomic_write(path, "wb") as handle:
        handle.write(json.dumps(document, ensure_ascii=False).encode("utf-8"))


def load_gnd_json(path: str | Path) -> GroundTruth:
    """Read a ground truth written by :func:`save_gnd_json`."""
    path = Path(path)
    try:
        document = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DatasetError(f"{path}: not JSON ({error})") from None
    if not isinstance(document, dict) or document.get("format") != JSON_FORMAT:
        raise DatasetError(f"{path}: not a {JSON_FORMAT} file")
    if document.get("version") != JSON_VERSION:
        raise DatasetError(f"{path}: {JSON_FORMAT} version {document.get('version')!r} is not supported")
    return _ground_truth(document, str(path))


# ---- Oxford 5k / Paris 6k text files ---------------------------------------------------------------------

_QUERY_FILE = re.compile(r"^(?P<name>(?P<landmark>.+)_(?P<number>\d+))_query\.txt$")


def _read_lines(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise DatasetError(f"{path}: cannot read ({error.strerror or error})") from None
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def load_oxford_text_gnd(folder: str | Path, images: Sequence[str] | None = None) -> GroundTruth:
    """The original Oxford 5k / Paris 6k ground truth: ``<name>_<n>_query.txt`` with ``_good``, ``_ok``, ``_junk``.

    A query file holds one line ``<image> x1 y1 x2 y2``; Oxford's ``oxc1_`` prefix on the image is dropped.
    The other three list image names (no extension), one per line. Per query, ``'ok'`` = good + ok and
    ``'junk'`` = junk, as ids into ``images`` — pass the full database list (every file name without
    extension) for the real protocol; without it, the database is the sorted set of names the files
    mention, which leaves out every unannotated image. Queries are sorted by landmark name, then number.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"{folder} is not a folder")
    found = sorted(
        (m["landmark"], int(m["number"]), m["name"]) for m in map(_QUERY_FILE.match, os.listdir(folder)) if m
    )
    if not found:
        raise DatasetError(f"{folder} has no *_query.txt files")
    names = [name for _, _, name in found]
    query_images, boxes, lists = [], [], []
    for name in names:
        lines = _read_lines(folder / f"{name}_query.txt")
        parts = lines[0].split() if len(lines) == 1 else []
        if len(parts) != 5:
            raise DatasetError(f"{folder / name}_query.txt: expected one line '<image> x1 y1 x2 y2'")
        try:
            box = np.array([float(value) for value in parts[1:]])
        except ValueError:
            raise DatasetError(f"{folder / name}_query.txt: the box is not four numbers") from None
        query_images.append(parts[0].removeprefix("oxc1_"))
        boxes.append(box)
        lists.append({kind: _read_lines(folder / f"{name}_{kind}.txt") for kind in ("good", "ok", "junk")})
    if images is None:
        mentioned = set(query_images).union(*(n for entry in lists for n in entry.values()))
        images = sorted(mentioned)
    images = tuple(images)
    index = {image: i for i, image in enumerate(images)}
    if len(index) != len(images):
        raise DatasetError("the database image list has duplicates")

    def ids(listed: list[str], where: str) -> np.ndarray:
        missing = [image for image in listed if image not in index]
        if missing:
            raise DatasetError(f"{where} names images not in the database: {missing[:3]}")
        return np.array([index[image] for image in listed], np.int64)

    gnd = tuple(
        {
            "bbx": box,
            "ok": ids(entry["good"] + entry["ok"], f"{folder / name}_good/_ok.txt"),
            "junk": ids(entry["junk"], f"{folder / name}_junk.txt"),
        }
        for name, box, entry in zip(names, boxes, lists, strict=True)
    )
    return GroundTruth(images, tuple(query_images), gnd, tuple(names))


# ---- INRIA Holidays and UKBench --------------------------------------------------------------------------

_HOLIDAYS_NAME = re.compile(r"^(?P<group>\d{4})(?P<item>\d{2})\.[^.]+$")
_UKBENCH_NAME = re.compile(r"^ukbench(?P<number>\d+)\.[^.]+$")


def holidays_groups(paths: Sequence[str | Path]) -> GroundTruth:
    """INRIA Holidays ground truth from file names ``GGGGII.jpg``: group ``GGGG``, query = the ``GGGG00`` image.

    Standard protocol: the database is every image given (``images`` = ``paths`` as strings, in order), the
    queries are the ``…00`` images sorted by group, and each query's positives (``'ok'``) are the other images
    of its group. The query is also in the database, so it is listed as ``'junk'``: it is removed from its own
    ranking, while it stays a database image (a distractor) for the other queries. A group without a ``…00``
    image gives no query. ``query_names`` are the group numbers.
    """
    groups: dict[str, list[int]] = {}
    query_of: dict[str, int] = {}
    stems: set[str] = set()
    for index, path in enumerate(paths):
        name = os.path.basename(os.fspath(path))
        match = _HOLIDAYS_NAME.match(name)
        if not match:
            raise DatasetError(f"{path}: not a Holidays file name (six digits and an extension)")
        stem = match["group"] + match["item"]
        if stem in stems:
            raise DatasetError(f"{path}: image {stem} is given twice")
        stems.add(stem)
        groups.setdefault(match["group"], []).append(index)
        if match["item"] == "00":
            query_of[match["group"]] = index
    query_groups = sorted(query_of)
    if not query_groups:
        raise DatasetError("no Holidays query image (a file named GGGG00.*) among the paths")
    gnd = tuple(
        {
            "ok": np.array([i for i in groups[group] if i != query_of[group]], np.int64),
            "junk": np.array([query_of[group]], np.int64),
        }
        for group in query_groups
    )
    images = tuple(os.fspath(path) for path in paths)
    return GroundTruth(images, tuple(images[query_of[g]] for g in query_groups), gnd, tuple(query_groups))


def ukbench_groups(paths: Sequence[str | Path]) -> np.ndarray:
    """(N,) int64 UKBench group of each ``ukbenchNNNNN.jpg``: ``NNNNN // 4`` (four images per object)."""
    groups = []
    for path in paths:
        match = _UKBENCH_NAME.match(os.path.basename(os.fspath(path)))
        if not match:
            raise DatasetError(f"{path}: not a UKBench file name (ukbenchNNNNN.jpg)")
        groups.append(int(match["number"]) // 4)
    return np.array(groups, np.int64)
