"""The `lookalike` command. Every command only calls the library."""

from __future__ import annotations

import typer

from lookalike.cli import check, collections, describe, evaluate, models, recognize, serve, system, train
from lookalike.cli.common import configure_logging

app = typer.Typer(
    help="lookalike: find and recognise images by their content.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(models.app, name="models")
app.command("describe")(describe.describe)
app.command("classify")(describe.classify)
app.command("index")(collections.index)
app.command("search")(collections.search)
app.command("recognize")(recognize.recognize)
app.command("info")(collections.info)
app.command("remove")(collections.remove)
app.command("export")(collections.export)
app.command("check")(check.check)
app.add_typer(collections.whiten_app, name="whiten")
app.add_typer(evaluate.app, name="evaluate")
app.command("system")(system.system)
app.command("serve")(serve.serve)
app.command("train")(train.train)


@app.callback()
def main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log what happens.")) -> None:
    configure_logging(verbose)
