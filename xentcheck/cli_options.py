"""The options the commands share (evaluation, loss options, output, ``--fail-on``) and
the values they give: names split at commas, validated loss options, precisions. The
``--loss-fn`` options are in :mod:`xentcheck.cli_functions`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from .case import LossOptions
from .case_validation import loss_options
from .precision import ACCUMULATE_CHOICES, DEFAULT_DTYPES, DTYPE_NAMES, Precision

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "json")
CHECK_FORMATS = ("table", "json", "junit", "github")


class FiniteFloat(click.ParamType[float]):
    """A finite number (``nan`` and ``inf`` are floats to Python, not to a tolerance or a
    sweep bound), optionally at least ``minimum``."""

    name = "FLOAT"

    def __init__(self, minimum: float | None = None) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            number = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number", param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        if self.minimum is not None and number < self.minimum:
            self.fail(f"{value!r} is negative; it must be at least {self.minimum:g}", param, ctx)
        return number


def split_names(values: Sequence[str]) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def apply_options(function: F, decorators: list[Callable[[F], F]]) -> F:
    """``function`` under ``decorators``, the first outermost (as if stacked above it, so
    ``--help`` lists the options in this order)."""
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def evaluation_options(function: F) -> F:
    """Options shared by the commands that evaluate cases."""
    return apply_options(function, [
        click.option("--dtype", "dtypes", multiple=True, metavar="NAME",
                     help=f"Storage dtype(s) to evaluate in: {', '.join(DTYPE_NAMES)} "
                          f"(repeat or comma-separate; default: {', '.join(DEFAULT_DTYPES)})."),
        click.option("--pipeline", "pipelines", multiple=True, metavar="NAME",
                     help="Formulation(s) to run (default: the textbook ones and torch, "
                          "those that apply; jax, fused, keras, accurate, online and chunked "
                          "run when named)."),
        click.option("--accumulate", type=click.Choice(ACCUMULATE_CHOICES), default="default",
                     show_default=True,
                     help="Reduction accumulate dtype; 'same' is a running sum in the storage "
                          "dtype itself."),
        click.option("--rtol", type=FiniteFloat(minimum=0.0), default=None,
                     help="Relative tolerance for every dtype (default: 8 eps of the dtype, "
                          "2 eps for the float8 ones)."),
        click.option("--atol", type=FiniteFloat(minimum=0.0), default=None,
                     help="Absolute tolerance for every dtype (default: 0)."),
    ])


def loss_option_flags(function: F) -> F:
    """``--z-loss``, ``--logit-softcap``, ``--temperature``: the loss options (scenario
    keys ``z_loss``, ``logit_softcap``, ``temperature``; docs/scenarios.md)."""
    return apply_options(function, [
        click.option("--z-loss", "z_loss", type=float, default=0.0,
                     help="Add COEF * logsumexp(x)^2 per counted example (PaLM's z-loss; "
                          "softmax from logits)."),
        click.option("--logit-softcap", "logit_softcap", type=float, default=None,
                     metavar="CAP", help="Soft-cap the logits to CAP * tanh(x / CAP) "
                                         "first (Gemma 2)."),
        click.option("--temperature", type=float, default=1.0, show_default=True,
                     help="Divide the logits by T first."),
    ])


def loss_option_values(z_loss: float, logit_softcap: float | None, temperature: float,
                       family: str = "softmax") -> LossOptions:
    """The validated loss options of a command that builds its own cases."""
    coef, cap, scale = loss_options(z_loss, logit_softcap, temperature, family, True)
    return LossOptions(scale, cap, coef)


def output_options(formats: Sequence[str]) -> Callable[[F], F]:
    """``--format`` (from ``formats``, the first the default) and ``--output``."""
    def decorate(function: F) -> F:
        return apply_options(function, [
            click.option("--format", "output_format", type=click.Choice(formats),
                         default=formats[0], show_default=True, help="Report format."),
            click.option("--output", type=click.Path(dir_okay=False, writable=True),
                         default=None,
                         help="Write the report to this file (the console gets a summary)."),
        ])
    return decorate


fail_on_option = click.option(
    "--fail-on", "fail_on", multiple=True, metavar="FLAGS[@PIPELINES]",
    help="Fail (exit 1) when any of these flags is raised, e.g. nan,inf or nan@stable.")


def precisions_from(dtypes: Sequence[str], default: Sequence[str],
                    accumulate: str) -> list[Precision]:
    """``--dtype`` values (or the default names), each once, with the accumulate policy."""
    names = split_names(dtypes) or list(default)
    return [Precision(name, accumulate) for name in dict.fromkeys(names)]  # type: ignore[arg-type]
