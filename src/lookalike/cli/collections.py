"""`lookalike index | search | info | remove | export | whiten`: a folder's collection from the shell."""

from __future__ import annotations

import os
import time
from pathlib import Path

import typer
from rich.table import Table

from lookalike.cli.common import console, errors, print_json, progress_bar, reported_errors, wants_progress
from lookalike.cli.describe import parse_scales
from lookalike.collection import Collection, SyncProgress, SyncReport
from lookalike.collection.export import export_collection
from lookalike.collection.fitting import fit_collection_pca_choice, fit_learned_from_folder
from lookalike.collection.local import LocalFeatureSettings
from lookalike.collection.sync import DEFAULT_COMMIT_EVERY
from lookalike.errors import ConfigError
from lookalike.extract import DescriptorSettings
from lookalike.rerank import DEFAULT_ALPHA, DEFAULT_N, parse_chain, registry_help
from lookalike.walk import walk_images

DEFAULT_COLLECTION = ".lookalike"


def collection_path(option: Path | None) -> Path:
    return option or Path(os.environ.get("LOOKALIKE_COLLECTION", DEFAULT_COLLECTION))


COLLECTION = typer.Option(
    None, "--collection", "-c", help="Collection folder (default: $LOOKALIKE_COLLECTION, else ./.lookalike)."
)
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bar, no table.")
JSON = typer.Option(False, "--json", help="Machine-readable output (JSON lines).")


def requested_settings(
    model: str | None, pooling: str | None, scales: str | None, imsize: int | None, precision: str
) -> DescriptorSettings | None:
    """Settings the user asked for, or None to keep an existing collection's own."""
    if model is None and pooling is None and scales is None and imsize is None:
        return None
    defaults = DescriptorSettings()
    return DescriptorSettings(
        model=model or defaults.model,
        pooling=pooling,
        scales=parse_scales(scales) if scales else defaults.scales,
        imsize=imsize or defaults.imsize,
        precision=precision,
    )


def summary_record(report: SyncReport, collection: Collection) -> dict:
    info = collection.info()
    return {
        "indexed": report.indexed,
        "reused": report.reused,
        "unchanged": report.unchanged,
        "removed": report.removed,
        "failed": [{"path": p, "error": e} for p, e in report.failed],
        "seconds": round(report.seconds, 3),
        "images_per_second": round(report.images_per_second, 2),
        "collection": {"path": info.path, "images": info.images, "whitening": info.whitening},
    }


def show_summary(report: SyncReport, collection: Collection) -> None:
    console.print(
        f"indexed {report.indexed}, reused {report.reused} (identical content), unchanged {report.unchanged}, "
        f"removed {report.removed}, failed {len(report.failed)} in {report.seconds:.1f} s "
        f"({report.images_per_second:.1f} images/s) → {collection.path} ({collection.info().images} images)",
        highlight=False,
    )
    for path, reason in report.failed:
        errors.print(f"[yellow]failed[/] {path}: {reason}", highlight=False)


def index(
    folder: Path = typer.Argument(..., help="Folder of photos, walked recursively (hidden files ignored)."),
    collection: Path = typer.Option(
        None, "--collection", "-c", help="Collection folder (default: FOLDER/.lookalike)."
    ),
    model: str = typer.Option(
        None, "--model", "-m", help=f"Registry name (default: {DescriptorSettings.model})."
    ),
    pooling: str = typer.Option(
        None, "--pooling", help="mac, spoc, rmac or gem (default: the model's own, see `models list`)."
    ),
    whiten: str = typer.Option(
        None, "--whiten", help="none, pca (fit on this collection) or learned (see `whiten fit`)."
    ),
    scales: str = typer.Option(None, "--scales", help="single, ms, seed-ms or a list (default: single)."),
    imsize: int = typer.Option(
        None, "--imsize", help=f"Long side cap (default: {DescriptorSettings.imsize})."
    ),
    precision: str = typer.Option(
        DescriptorSettings.precision, "--precision", help="auto, fp32 or bf16 (speed only; not a setting)."
    ),
    rebuild: bool = typer.Option(
        False, "--rebuild", help="Discard the collection and index again with these settings."
    ),
    commit_every: int = typer.Option(
        DEFAULT_COMMIT_EVERY, "--commit-every", help="Images per durable commit."
    ),
    local_features: str = typer.Option(
        None,
        "--local-features",
        help="Also keep local features of every image for spatial verification (`--rerank sv`): xfeat, "
        "sift or none (default: what the collection keeps; none at first). Without them sv computes "
        "a candidate's features when it first needs them.",
    ),
    dba: str = typer.Option(
        None,
        "--dba",
        help="Apply DBA at index time and keep it current (`--rerank dba` then reads it): n=2,alpha=3 "
        "(either may be left out), or none to stop. Default: what the collection keeps.",
    ),
    neighbours: str = typer.Option(
        None,
        "--neighbours",
        help="Keep the kNN graph that `--rerank diffusion` reads, K neighbours per image (e.g. 50), or "
        "none. Default: what the collection keeps (DBA keeps one too).",
    ),
    quiet: bool = QUIET,
    as_json: bool = JSON,
) -> None:
    """Index a folder incrementally: new and changed images described, deleted ones removed."""
    with reported_errors():
        if whiten not in (None, "none", "pca", "learned"):
            raise ConfigError(f"--whiten must be none, pca or learned, got {whiten!r}")
        if whiten == "learned":
            raise ConfigError(
                "learned whitening needs labelled pairs: run `lookalike whiten fit --labelled DIR`"
            )
        settings = requested_settings(model, pooling, scales, imsize, precision)
        path = collection or folder / DEFAULT_COLLECTION
        with Collection.open_or_create(path, settings, root=folder, rebuild=rebuild) as opened:
            if local_features is not None:
                wanted = None if local_features == "none" else LocalFeatureSettings(local_features)
                opened.set_local_settings(wanted)
            report = _sync_with_progress(opened, folder, commit_every, wants_progress(quiet, as_json))
            if dba is not None:
                opened.set_augmentation(*parse_dba(dba))
            if neighbours is not None:
                opened.keep_neighbours(
                    None if neighbours == "none" else parse_count(neighbours, "--neighbours")
                )
            if whiten == "pca":
                fitted, choice = fit_collection_pca_choice(opened)
                opened.set_whitening(fitted)
                if not (quiet or as_json):
                    console.print(f"pca whitening {choice.summary()}", highlight=False)
            elif whiten == "none" and opened.whitening is not None:
                opened.set_whitening(None)
            if as_json:
                print_json(summary_record(report, opened))
            elif not quiet:
                show_summary(report, opened)


def parse_dba(text: str) -> tuple[int | None, float]:
    """``n=2,alpha=3`` (either optional) → (n, alpha); ``none`` → (None, α default)."""
    if text.strip().lower() == "none":
        return None, DEFAULT_ALPHA
    values: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, equals, value = part.partition("=")
        if not equals or key.strip() not in ("n", "alpha"):
            raise ConfigError(f"--dba takes n=N,alpha=A (or none), got {text!r}")
        values[key.strip()] = value.strip()
    try:
        return int(values.get("n", DEFAULT_N)), float(values.get("alpha", DEFAULT_ALPHA))
    except ValueError:
        raise ConfigError(f"--dba takes n=N,alpha=A with N an integer, got {text!r}") from None


def parse_count(text: str, option: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{option} takes a number of neighbours or none, got {text!r}") from None


def _sync_with_progress(collection: Collection, folder: Path, commit_every: int, show: bool) -> SyncReport:
    with progress_bar(show) as bar:
        if bar is None:
            return collection.sync(folder, commit_every=commit_every)
        task = bar.add_task("indexing", total=None, rate="")
        started = time.perf_counter()

        def update(event: SyncProgress) -> None:
            rate = event.done / max(time.perf_counter() - started, 1e-9)
            bar.update(task, total=event.total, completed=event.done, rate=f"{rate:.1f} img/s")

        return collection.sync(folder, progress=update, commit_every=commit_every)


def parse_bbox(text: str | None) -> tuple[float, float, float, float] | None:
    if text is None:
        return None
    try:
        x0, y0, x1, y1 = (float(v) for v in text.split(","))
    except ValueError:
        raise typer.BadParameter("--bbox takes x0,y0,x1,y1") from None
    return (x0, y0, x1, y1)


def parse_id(text: str) -> int:
    try:
        image_id = int(text[3:])
    except ValueError:
        raise typer.BadParameter(f"an indexed image is id:N with N a number, got {text!r}") from None
    if not 1 <= image_id < 2**63:
        raise typer.BadParameter(f"no image has the id {image_id} (ids are 1 to 2^63 - 1)")
    return image_id


def search(
    query: str = typer.Argument(
        ..., help="An image file, a folder of query images, an indexed path or id:N."
    ),
    collection: Path = COLLECTION,
    k: int = typer.Option(30, "-k", "--top", help="How many results."),
    bbox: str = typer.Option(None, "--bbox", help="Crop the query to x0,y0,x1,y1 first."),
    rerank: str = typer.Option(
        "none",
        "--rerank",
        help="Re-rankers applied left to right, comma-separated, options after a colon: none, aqe, "
        "dba,aqe, aqe:n=5,alpha=1 or sv:top=100 (an indexed query is never its own neighbour). "
        f"{registry_help()}",
    ),
    as_json: bool = JSON,
) -> None:
    """The most similar indexed images: a table in a terminal, JSON lines when piped or with --json."""
    try:
        chain = parse_chain(rerank)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--rerank") from None
    with reported_errors(), Collection.open(collection_path(collection), readonly=True) as opened:
        target = Path(query)
        if target.is_dir():
            results = opened.search_files(list(walk_images(target)), k, chain)
            queries = [(str(r.path), r.hits) for r in results if r.error is None]
            for skipped in (r for r in results if r.error is not None):
                errors.print(f"[yellow]skipped[/] {skipped.path}: {skipped.error}", highlight=False)
        else:
            key: int | str = parse_id(query) if query.startswith("id:") else query
            queries = [(query, opened.search(key, k, parse_bbox(bbox), chain))]
        as_lines = as_json or not console.is_terminal
        for name, hits in queries:
            if as_lines:
                for hit in hits:
                    print_json(
                        {
                            "query": name,
                            "rank": hit.rank,
                            "id": hit.id,
                            "path": hit.path,
                            "score": round(hit.score, 6),
                        }
                    )
            else:
                table = Table(title=f"{name} — top {len(hits)}")
                for column in ("rank", "score", "id", "path"):
                    table.add_column(column, justify="right" if column != "path" else "left")
                for hit in hits:
                    table.add_row(str(hit.rank), f"{hit.score:.4f}", str(hit.id), hit.path)
                console.print(table)


def info(collection: Path = COLLECTION, as_json: bool = JSON) -> None:
    """Settings, counts and size of a collection."""
    with reported_errors(), Collection.open(collection_path(collection), readonly=True) as opened:
        record = opened.info_dict()
    if as_json:
        print_json(record)
        return
    for key, value in record.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items())
        console.print(f"[bold]{key:>18}[/]  {value}", highlight=False)


def remove(
    paths: list[str] = typer.Argument(..., help="Indexed paths (relative) or files."),
    collection: Path = COLLECTION,
) -> None:
    """Forget images (the files themselves are not touched)."""
    with reported_errors(), Collection.open(collection_path(collection)) as opened:
        removed = opened.remove(paths)
    console.print(f"removed {removed} of {len(paths)}", highlight=False)


def export(
    out: Path = typer.Option(..., "--out", "-o", help="Folder for descriptors.npy + images.csv."),
    collection: Path = COLLECTION,
    as_json: bool = JSON,
) -> None:
    """Write the descriptors (.npy, float32) and their images (.csv) for other tools; see docs/formats.md."""
    with reported_errors(), Collection.open(collection_path(collection), readonly=True) as opened:
        written = export_collection(opened, out)
    if as_json:
        print_json({k: str(v) for k, v in written.items()})
    else:
        for kind, path in written.items():
            console.print(f"{kind}: {path}", highlight=False)


whiten_app = typer.Typer(
    help="Whitening on top of a collection's descriptors (no re-extraction).", no_args_is_help=True
)


@whiten_app.command("fit")
def whiten_fit(
    collection: Path = COLLECTION,
    labelled: Path = typer.Option(
        None, "--labelled", help="Labelled folder (class = sub-folder): learned whitening."
    ),
    dim: int = typer.Option(
        None, "--dim", help="Keep this many dimensions (PCA: at most images − 1; default all of those)."
    ),
    shrinkage: float = typer.Option(
        None,
        "--shrinkage",
        help="PCA: shrink eigenvalues towards their mean, 0 (plain) to 1 (none); default: chosen from the "
        "number of images, at most one whitened direction per 100 images.",
    ),
) -> None:
    """PCA-whitening fitted on the collection itself, or learned whitening from a labelled folder's pairs."""
    with reported_errors(), Collection.open(collection_path(collection)) as opened:
        if labelled:
            if shrinkage is not None:
                raise ConfigError("--shrinkage is for PCA-whitening, not learned whitening (--labelled)")
            fitted = fit_learned_from_folder(opened, str(labelled), dim)
            described = f"{fitted.input_dim} → {fitted.dim}"
        else:
            fitted, choice = fit_collection_pca_choice(opened, dim, shrinkage)
            described = choice.summary()
        opened.set_whitening(fitted)
    console.print(f"{fitted.kind} whitening {described}; applied to {opened.path}", highlight=False)


@whiten_app.command("remove")
def whiten_remove(collection: Path = COLLECTION) -> None:
    """Search on the raw descriptors again."""
    with reported_errors(), Collection.open(collection_path(collection)) as opened:
        opened.set_whitening(None)
