"""`lookalike models ...`: the weights registry."""

from __future__ import annotations

import typer
from rich.table import Table

from lookalike.cli.common import console, lines_wanted, print_json, reported_errors, wants_progress
from lookalike.registry import get_model_config, list_models
from lookalike.weights import cache_path, pull

app = typer.Typer(help="List, pull and inspect pretrained models.", no_args_is_help=True)


@app.command("list")
def list_command(
    as_json: bool = typer.Option(False, "--json", help="One JSON object per model (what a pipe gets)."),
) -> None:
    """Every registered model: architecture, preprocessing, dimension, licence, sources, cache state (a
    table in a terminal, one JSON line per model when piped or with --json)."""
    configs = list_models()
    if lines_wanted(as_json):
        for config in configs:
            print_json(
                {
                    "name": config.name,
                    "arch": config.arch,
                    "kind": config.kind,
                    "dim": config.feature_dim,
                    "pooling": config.pooling,
                    "preprocess": config.preprocess.describe(),
                    "imsize": config.imsize,
                    "licence": config.licence,
                    "cached": cache_path(config).exists(),
                    "sources": [
                        {"kind": s.kind, "locator": s.locator, "sha256": s.sha256, "member": s.member}
                        for s in config.sources
                    ],
                    "description": config.description,
                }
            )
        return
    table = Table(title="lookalike models")
    for column in ("name", "arch", "dim", "pooling", "preprocessing", "licence", "cached", "source"):
        table.add_column(column, overflow="fold")
    for config in configs:
        source = config.sources[0]
        table.add_row(
            config.name,
            config.arch if config.kind == "global" else f"{config.arch} (local features)",
            str(config.feature_dim),
            config.pooling if config.kind == "global" else "-",
            f"{config.preprocess.describe()}, {config.imsize}px",
            config.licence,
            "yes" if cache_path(config).exists() else ("internet" if config.needs_internet else "no"),
            f"{source.kind}: {source.locator}",
        )
    console.print(table)


@app.command("pull")
def pull_command(
    names: list[str] = typer.Argument(..., help="Model names, see `lookalike models list`."),
    force: bool = typer.Option(False, "--force", help="Download and convert again even if cached."),
    sha256: str = typer.Option(None, "--sha256", help="Expected sha256, for sources that publish none."),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
) -> None:
    """Download, verify (sha256) and convert weights into the cache."""
    with reported_errors():
        for name in names:
            config = get_model_config(name)
            if wants_progress(quiet, False):
                with console.status(f"pulling {name} ..."):
                    path = pull(config, force=force, sha256=sha256)
            else:
                path = pull(config, force=force, sha256=sha256)
            if not quiet:
                console.print(f"{name}: {path}", highlight=False)


@app.command("path")
def path_command(name: str) -> None:
    """Where the converted weights of NAME are (or will be) cached."""
    with reported_errors():
        console.print(str(cache_path(get_model_config(name))), highlight=False)
