"""Options several commands share, each defined once, its default read from the library's dataclass.

Descriptor options (``--model``, ``--pooling``, ``--scales``, ``--imsize``, ``--precision``) take their
defaults from :class:`~lookalike.extract.DescriptorSettings`; the recognition options of ``recognize`` and
``serve`` from :class:`~lookalike.recognize.RecognizerOptions`, and reach the command as one value through
:func:`recognition_options`.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import typer

from lookalike.cli.common import reported_errors
from lookalike.extract import MULTI_SCALES, SEED_MULTI_SCALES, DescriptorSettings
from lookalike.recognize.knn import METHODS, TRANSFORMS
from lookalike.recognize.service import DEFAULT_ALPHA, WHITEN_CHOICES, RecognizerOptions

NAMED_SCALES = {"single": (1.0,), "ms": MULTI_SCALES, "seed-ms": SEED_MULTI_SCALES}


def scales_name(scales: tuple[float, ...]) -> str:
    """The command-line name of ``scales``: a key of :data:`NAMED_SCALES`, else the comma list."""
    return next((name for name, value in NAMED_SCALES.items() if value == scales), ",".join(map(str, scales)))


def parse_scales(text: str) -> tuple[float, ...]:
    """``single``, ``ms`` (1, 1/√2, 1/2), ``seed-ms`` (1, √2, 1/√2) or a comma list like ``1,0.707,0.5``."""
    if text in NAMED_SCALES:
        return NAMED_SCALES[text]
    try:
        return tuple(float(part) for part in text.split(","))
    except ValueError:
        raise typer.BadParameter(
            f"scales must be {', '.join(NAMED_SCALES)} or numbers like 1,0.707"
        ) from None


def one_of(choices: Sequence[str]) -> Callable[[Any], Any]:
    """A parameter callback refusing, as a usage error, a value outside ``choices`` (each value of a
    repeated option)."""

    def check(value: Any) -> Any:
        for item in value if isinstance(value, list | tuple) else [value]:
            if item is not None and item not in choices:
                raise typer.BadParameter(f"{item!r} is not one of {', '.join(choices)}")
        return value

    return check


DEFAULT_SCALES = scales_name(DescriptorSettings.scales)

MODEL = typer.Option(
    DescriptorSettings.model, "--model", "-m", help="Registry name, see `lookalike models list`."
)
POOLING = typer.Option(
    None, "--pooling", help="mac, spoc, rmac or gem (default: the model's own, see `models list`)."
)
SCALES = typer.Option(
    DEFAULT_SCALES, "--scales", help="single, ms (1,1/√2,1/2), seed-ms (1,√2,1/√2) or a list."
)
IMSIZE = typer.Option(
    DescriptorSettings.imsize, "--imsize", help="Long side cap in pixels; smaller images are not upscaled."
)
PRECISION = typer.Option(
    DescriptorSettings.precision,
    "--precision",
    help="auto (bf16 where the CPU has it and it agrees), fp32, bf16.",
)

# RecognizerOptions field → (command-line type, option); defaults are the dataclass's.
RECOGNITION: dict[str, tuple[Any, Any]] = {
    "method": (
        str,
        typer.Option(
            RecognizerOptions.method, "--method", help=f"Voting rule, one of: {', '.join(METHODS)}."
        ),
    ),
    "k": (int, typer.Option(RecognizerOptions.k, "-k", min=1, help="Neighbours that vote (1-NN uses 1).")),
    "transform": (
        str,
        typer.Option(
            RecognizerOptions.transform,
            "--transform",
            help=f"Similarity transform, one of: {', '.join(TRANSFORMS)}.",
        ),
    ),
    "alpha": (
        float | None,
        typer.Option(
            RecognizerOptions.alpha,
            "--alpha",
            show_default=False,
            help=f"Expansion distance of --method alpha (default: {DEFAULT_ALPHA}).",
        ),
    ),
    "labels": (
        Path | None,
        typer.Option(
            RecognizerOptions.labels,
            "--labels",
            show_default=False,
            help="CSV of path,label (default: the first folder below the collection root).",
        ),
    ),
    "whiten": (
        str,
        typer.Option(
            RecognizerOptions.whiten,
            "--whiten",
            help=f"PCA-whiten with the references, one of: {', '.join(WHITEN_CHOICES)} (auto: when there "
            "are at least as many references as dimensions).",
        ),
    ),
}

Command = TypeVar("Command", bound=Callable[..., Any])


def recognition_options(command: Command) -> Command:
    """Give ``command`` the options of :data:`RECOGNITION` (``--method``, ``-k``, ``--transform``,
    ``--alpha``, ``--labels``, ``--whiten``) in place of its parameter ``recognition``, which receives them
    as one :class:`RecognizerOptions` (an inconsistent combination is refused with the reason)."""
    signature = inspect.signature(command, eval_str=True)
    if "recognition" not in signature.parameters:
        raise TypeError(f"{command.__name__} has no parameter 'recognition'")
    parameters: list[inspect.Parameter] = []
    for parameter in signature.parameters.values():
        if parameter.name != "recognition":
            parameters.append(parameter)
            continue
        parameters += [
            inspect.Parameter(name, parameter.kind, default=option, annotation=kind)
            for name, (kind, option) in RECOGNITION.items()
        ]

    @functools.wraps(command)
    def with_options(**values: Any) -> Any:
        with reported_errors():
            recognition = RecognizerOptions(**{name: values.pop(name) for name in RECOGNITION})
        return command(**values, recognition=recognition)

    with_options.__signature__ = signature.replace(parameters=parameters)  # type: ignore[attr-defined]
    with_options.__annotations__ = {p.name: p.annotation for p in parameters}
    return with_options  # type: ignore[return-value]
