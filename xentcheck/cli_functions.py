"""The command-line options for users' own loss functions (``--loss-fn``, ``--framework``,
``--traceback``), and the pipelines they add."""

from __future__ import annotations

from collections.abc import Sequence

import click

from .cli_options import F, apply_options
from .errors import UsageError
from .pipelines import Pipeline
from .user_functions import FRAMEWORK_CHOICES
from .user_functions.loading import UserFunction, load_function
from .user_functions.pipeline import user_pipeline


def function_options(function: F) -> F:
    """``--loss-fn``, ``--framework`` and ``--traceback``: users' own loss functions."""
    return apply_options(function, [
        click.option("--loss-fn", "loss_fns", multiple=True, metavar="SPEC",
                     help="Your own loss function, run beside the pipelines: "
                          "path/to/file.py:NAME or package.module:NAME, called as "
                          "NAME(logits, labels) (repeatable). Importing it runs its code."),
        click.option("--framework", type=click.Choice(FRAMEWORK_CHOICES), default="auto",
                     show_default=True,
                     help="What the --loss-fn functions are written in; auto: torch or jax "
                          "when the function's module imports it, else numpy."),
        click.option("--traceback", "show_traceback", is_flag=True,
                     help="When a --loss-fn function fails, also print its traceback."),
    ])


def load_functions(specs: Sequence[str], framework: str) -> list[UserFunction]:
    """The --loss-fn functions, imported (paths relative to the working directory)."""
    if framework != "auto" and not specs:
        raise UsageError("--framework applies to --loss-fn functions; none was given")
    return [load_function(spec, framework) for spec in dict.fromkeys(specs)]


def with_functions(pipelines: Sequence[Pipeline], functions: Sequence[UserFunction],
                   family: str, from_logits: bool, rank: int = 2) -> tuple[Pipeline, ...]:
    """The pipelines, then a pipeline for each user function (each SPEC once), called with
    logits of ``rank`` axes (a case's own; limits and sweeps: rows of classes)."""
    unique = {f.spec: f for f in functions}
    return (*pipelines, *(user_pipeline(f, family, from_logits, rank)
                          for f in unique.values()))


