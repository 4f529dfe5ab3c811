"""The command line: thin over the library. Library errors become one line and exit 2."""

from __future__ import annotations

import math
import os
import re
import sys
import textwrap
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from . import __version__, execution
from .allocator import keep_freed_memory
from .arrays import RAW_DTYPES, load_array, load_csv_with_labels
from .case import DEFAULT_CHUNK_SIZE, Case, LossOptions
from .case_validation import loss_options, make_case
from .cli_functions import function_options, load_functions, with_functions
from .discovery import find_scenarios
from .errors import UsageError, XentcheckError
from .evaluator import Progress, evaluate, left_out
from .expectations import Checked, parse_fail_on
from .expectations import check as check_expectations
from .findings import ScenarioResult, Tolerance
from .limits import limit_rows
from .misuse import explain as explain_rule
from .pipelines import Pipeline, available, select
from .plot import plot_format, write_sweep_plot
from .precision import ACCUMULATE_CHOICES, DEFAULT_DTYPES, DTYPE_NAMES, Precision
from .report_github import render_annotations, render_step_summary
from .report_json import render_json, render_limits_json, render_sweep_json
from .report_junit import render_junit
from .report_table import (
    render_limits_table,
    render_sweep_table,
    render_table,
    render_verdict,
)
from .scenario import Scenario, ToleranceSpec, load_scenarios
from .sweep import PATTERNS, SweepSpec, run_sweep
from .user_functions.loading import UserFunction

F = TypeVar("F", bound=Callable[..., Any])
FORMATS = ("table", "json")
CHECK_FORMATS = ("table", "json", "junit", "github")


class InputFailure(click.ClickException):
    """A XentcheckError at the edge: ``xentcheck: error: <message>`` and exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"xentcheck: error: {self.format_message()}", err=True)


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


class OneLineErrors(click.Group):
    """Click's usage errors (a bad option value, a missing argument) as one line on stderr,
    exit 2, like every other input error, instead of a usage block."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except InputFailure:
            raise
        except click.UsageError as exc:
            command = exc.ctx.command_path if exc.ctx is not None else ctx.command_path
            message = exc.format_message().rstrip(".")
            raise InputFailure(f"{message} (see: {command} --help)") from None


def _names(values: Sequence[str]) -> list[str]:
    """Repeatable options that also take comma-separated lists."""
    return [name.strip() for value in values for name in value.split(",") if name.strip()]


def _apply(function: F, decorators: list[Callable[[F], F]]) -> F:
    for decorator in reversed(decorators):
        function = decorator(function)
    return function


def evaluation_options(function: F) -> F:
    """Options shared by the commands that evaluate cases."""
    return _apply(function, [
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
    return _apply(function, [
        click.option("--z-loss", "z_loss", type=float, default=0.0,
                     help="Add COEF * logsumexp(x)^2 per counted example (PaLM's z-loss; "
                          "softmax from logits)."),
        click.option("--logit-softcap", "logit_softcap", type=float, default=None,
                     metavar="CAP", help="Soft-cap the logits to CAP * tanh(x / CAP) "
                                         "first (Gemma 2)."),
        click.option("--temperature", type=float, default=1.0, show_default=True,
                     help="Divide the logits by T first."),
    ])


def _option_values(z_loss: float, logit_softcap: float | None, temperature: float,
                   family: str = "softmax") -> LossOptions:
    """The validated loss options of a command that builds its own cases."""
    coef, cap, scale = loss_options(z_loss, logit_softcap, temperature, family, True)
    return LossOptions(scale, cap, coef)


def output_options(formats: Sequence[str]) -> Callable[[F], F]:
    """``--format`` (from ``formats``, the first the default) and ``--output``."""
    def decorate(function: F) -> F:
        return _apply(function, [
            click.option("--format", "output_format", type=click.Choice(formats),
                         default=formats[0], show_default=True, help="Report format."),
            click.option("--output", type=click.Path(dir_okay=False, writable=True),
                         default=None,
                         help="Write the report to this file (the console gets a summary)."),
        ])
    return decorate


def _failure(exc: XentcheckError, show_traceback: bool) -> InputFailure:
    """The one-line error; with --traceback, the user's exception's traceback first."""
    cause = getattr(exc, "cause", None)
    if show_traceback and cause is not None:
        click.echo("".join(traceback.format_exception(cause)).rstrip("\n"), err=True)
    return InputFailure(str(exc))


fail_on_option = click.option(
    "--fail-on", "fail_on", multiple=True, metavar="FLAGS[@PIPELINES]",
    help="Fail (exit 1) when any of these flags is raised, e.g. nan,inf or nan@stable.")


# Inputs larger than this (values x pipeline-precision pairs) take about a second or more.
PROGRESS_WORK = 1 << 25


@contextmanager
def progress_bar(case: Case, pairs: int) -> Iterator[Progress | None]:
    """A rich progress bar on stderr for inputs that take a while; nothing otherwise, and
    nothing when stderr is not a terminal (logs and pipes stay clean)."""
    work = int(np.prod(case.shape)) * max(1, pairs)
    console = Console(stderr=True)
    if work < PROGRESS_WORK or not console.is_terminal:
        yield None
        return
    with RichProgress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("rows"), TimeRemainingColumn(), console=console, transient=True,
    ) as bar:
        task = bar.add_task(f"xentcheck {case.name}", total=case.rows)

        def advance(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield advance


# Width of a report that goes to neither a terminal nor COLUMNS (a log, a CI job): the wide
# layout of every table fits.
UNBOUNDED_WIDTH = 180


def known_width(stream: Any) -> int | None:
    """The width the reader sees: ``COLUMNS`` when set (for a terminal, a pipe or a file
    alike), else the width of the terminal the output goes to, else, piped or redirected
    from a terminal, the width of that terminal (stderr still shows it); None when no
    terminal is in sight (a log, a CI job)."""
    columns = os.environ.get("COLUMNS", "").strip()
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    for candidate in (stream, sys.stderr):
        try:
            if candidate.isatty():
                return os.get_terminal_size(candidate.fileno()).columns
        except (AttributeError, OSError, ValueError):
            continue  # no file descriptor behind it (a test runner's capture)
    return None


def make_console(file: Any = None) -> Console:
    """A console that honours NO_COLOR / FORCE_COLOR and ``COLUMNS`` (also when piped),
    and lays its tables out for that width (see :mod:`xentcheck.layout`)."""
    force = os.environ.get("FORCE_COLOR", "") not in ("", "0")
    no_color = bool(os.environ.get("NO_COLOR"))
    stream = file or sys.stdout
    terminal = force or (hasattr(stream, "isatty") and stream.isatty())
    return Console(
        file=stream,
        force_terminal=terminal and not no_color if force else None,
        no_color=no_color,
        width=known_width(stream) or UNBOUNDED_WIDTH,
        highlight=False,
        soft_wrap=False,
    )


@click.group(cls=OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="xentcheck")
def cli() -> None:
    """Where, and in which precision, does a cross-entropy loss stop telling the truth?

    Runs the loss through several formulations in float16, bfloat16, float32 and float64
    (float8_e4m3fn and float8_e5m2 when named), measures each against a float64-accurate
    reference, and reports what broke and where.

    Example: xentcheck run configs/naive_overflow.yaml
    """
    keep_freed_memory()  # large inputs: reuse freed temporaries instead of faulting them in


@cli.command()
@click.argument("scenarios", nargs=-1, type=click.Path(dir_okay=True, path_type=Path))
@click.option("--logits", "logits_file", type=click.Path(path_type=Path), default=None,
              help="Logits (or probabilities) file: .npy, .npz, .csv or .safetensors.")
@click.option("--logits-key", default=None, help="Array name inside an .npz/.safetensors file.")
@click.option("--logits-dtype", type=click.Choice(RAW_DTYPES), default=None,
              help="The type of the file's raw 2-byte values: numpy saves ml_dtypes' bfloat16 "
                   "in .npy as |V2, which reads back as bytes.")
@click.option("--labels", "labels_file", type=click.Path(path_type=Path), default=None,
              help="Labels file (integer ids, one-hot/probability rows, or 0..1 targets).")
@click.option("--labels-key", default=None, help="Array name inside an .npz/.safetensors file.")
@click.option("--labels-dtype", type=click.Choice(RAW_DTYPES), default=None,
              help="As --logits-dtype, for the labels file.")
@click.option("--label-column", default=None, metavar="NAME|INDEX",
              help="With a .csv --logits file and no --labels: the column holding the labels.")
@click.option("--loss", type=click.Choice(["softmax", "sigmoid"]), default="softmax",
              show_default=True, help="Loss family for --logits.")
@click.option("--probabilities", is_flag=True,
              help="The --logits file holds probabilities (from_logits: false).")
@click.option("--reduction", type=click.Choice(["none", "sum", "mean"]), default="mean",
              show_default=True, help="Batch reduction for --logits.")
@click.option("--ignore-index", type=int, default=None, help="Label value that counts nowhere.")
@click.option("--label-smoothing", type=float, default=0.0, help="Label smoothing (softmax).")
@loss_option_flags
@click.option("--chunk-size", type=click.IntRange(min=1), default=None,
              help=f"Classes per chunk of the chunked formulation, for --logits "
                   f"(default {DEFAULT_CHUNK_SIZE}; a scenario file gives chunk_size).")
@evaluation_options
@function_options
@fail_on_option
@output_options(CHECK_FORMATS)
def run(
    scenarios: tuple[Path, ...],
    logits_file: Path | None,
    logits_key: str | None,
    logits_dtype: str | None,
    labels_file: Path | None,
    labels_key: str | None,
    labels_dtype: str | None,
    label_column: str | None,
    loss: str,
    probabilities: bool,
    reduction: str,
    ignore_index: int | None,
    label_smoothing: float,
    z_loss: float,
    logit_softcap: float | None,
    temperature: float,
    chunk_size: int | None,
    dtypes: tuple[str, ...],
    pipelines: tuple[str, ...],
    accumulate: str,
    rtol: float | None,
    atol: float | None,
    loss_fns: tuple[str, ...],
    framework: str,
    show_traceback: bool,
    fail_on: tuple[str, ...],
    output_format: str,
    output: str | None,
) -> None:
    """Evaluate scenario files, or logits and labels given as files.

    Exit status 1 when a scenario's expectations or a --fail-on rule fail.

    \b
    Examples:
      xentcheck run configs/naive_overflow.yaml
      xentcheck run configs/*.yaml --dtype bfloat16,float32 --format json
      xentcheck run --logits logits.npy --labels labels.npy --loss softmax
      xentcheck run examples/numpy_textbook.yaml --loss-fn examples/numpy_stable.py:loss
    """
    try:
        files = InputFiles(logits_file, logits_key, logits_dtype, labels_file, labels_key,
                           labels_dtype, label_column)
        functions = load_functions(loss_fns, framework)
        loaded = _scenarios(scenarios, files, loss, probabilities, reduction, ignore_index,
                            label_smoothing, LossOptions(temperature, logit_softcap, z_loss),
                            chunk_size)
        checked = _check_all(loaded, dtypes, pipelines, accumulate, rtol, atol, fail_on,
                             functions)
    except XentcheckError as exc:
        raise _failure(exc, show_traceback) from None
    _report(checked, output_format, output, summary_only=False)
    if not all(c.verdict.passed for c in checked):
        sys.exit(1)


@cli.command()
@click.argument("paths", nargs=-1, type=click.Path(path_type=Path))
@evaluation_options
@function_options
@fail_on_option
@output_options(CHECK_FORMATS)
def check(
    paths: tuple[Path, ...],
    dtypes: tuple[str, ...],
    pipelines: tuple[str, ...],
    accumulate: str,
    rtol: float | None,
    atol: float | None,
    loss_fns: tuple[str, ...],
    framework: str,
    show_traceback: bool,
    fail_on: tuple[str, ...],
    output_format: str,
    output: str | None,
) -> None:
    """Check the expectations of every scenario under the files or folders given.

    The default is configs/. One line per scenario, pass or fail and why; exit 0 when all
    hold, 1 when any fails, 2 for a usage or input error.

    \b
    Examples:
      xentcheck check
      xentcheck check configs/ --format junit --output xentcheck.xml
      xentcheck check --fail-on nan,inf@stable --format github
    """
    try:
        functions = load_functions(loss_fns, framework)
        loaded = find_scenarios(paths or (Path("configs"),), note=_note)
        checked = _check_all(loaded, dtypes, pipelines, accumulate, rtol, atol, fail_on,
                             functions)
    except XentcheckError as exc:
        raise _failure(exc, show_traceback) from None
    _report(checked, output_format, output, summary_only=True)
    if not all(c.verdict.passed for c in checked):
        sys.exit(1)


def _note(message: str) -> None:
    click.echo(f"xentcheck: note: {message}", err=True)


def _check_all(
    loaded: Sequence[Scenario], dtypes: tuple[str, ...], pipelines: tuple[str, ...],
    accumulate: str, rtol: float | None, atol: float | None, fail_on: tuple[str, ...],
    functions: Sequence[UserFunction] = (),
) -> list[Checked]:
    """Evaluate each scenario (with the --loss-fn ``functions`` beside its own) and judge
    its expectations and the --fail-on rules."""
    rules = parse_fail_on(fail_on)
    override = None
    if rtol is not None or atol is not None:
        override = ToleranceSpec(everywhere=Tolerance(rel=rtol or 0.0, abs=atol or 0.0))
    checked = []
    for scenario in loaded:
        result = _evaluate(scenario, _names(dtypes), _names(pipelines), accumulate, override,
                           functions)
        expectations = (*scenario.expectations, *rules)
        verdict = check_expectations(result, expectations)
        checked.append(Checked(result, verdict, expectations))
    return checked


@dataclass(frozen=True)
class InputFiles:
    """``run``'s --logits/--labels options."""

    logits: Path | None
    logits_key: str | None
    logits_dtype: str | None
    labels: Path | None
    labels_key: str | None
    labels_dtype: str | None
    label_column: str | None

    def given(self) -> list[str]:
        """The options given, as written on the command line."""
        return [f"--{name.replace('_', '-')}" for name, value in vars(self).items()
                if value is not None]


def _scenarios(
    paths: tuple[Path, ...], files: InputFiles, loss: str,
    probabilities: bool, reduction: str, ignore_index: int | None, label_smoothing: float,
    options: LossOptions,
    chunk_size: int | None = None,
) -> list[Scenario]:
    logits_file, labels_file = files.logits, files.labels
    if paths and files.given():
        raise click.UsageError(f"give scenario files or {files.given()[0]}, not both")
    if not paths and logits_file is None:
        if files.given():
            raise click.UsageError(f"{files.given()[0]} needs --logits FILE")
        raise click.UsageError("give a scenario file, or --logits FILE (and --labels FILE)")
    if logits_file is None:
        given = [flag for flag, value in (("--z-loss", options.z_loss),
                                          ("--logit-softcap", options.logit_softcap),
                                          ("--temperature", options.temperature != 1.0),
                                          ("--chunk-size", chunk_size is not None))
                 if value]
        if given:
            raise click.UsageError(f"{given[0]} applies to --logits; a scenario file gives "
                                   "the loss options as keys")
        return [s for path in paths for s in load_scenarios(path)]
    source = "<command line>"
    if files.label_column is not None:
        if labels_file is not None:
            raise click.UsageError("give --labels or --label-column, not both")
        unused = [o for o in files.given() if o not in ("--logits", "--label-column")]
        if unused:
            raise click.UsageError(f"{unused[0]} does not apply to --label-column (the logits "
                                   "and labels are numbers in one .csv file)")
        logits, labels = load_csv_with_labels(logits_file, files.label_column, source=source,
                                              field="--label-column")
    elif labels_file is None:
        unused = [o for o in files.given() if o.startswith("--labels-")]
        if unused:
            raise click.UsageError(f"{unused[0]} needs --labels FILE")
        raise click.UsageError("--logits needs --labels FILE (or --label-column for a .csv)")
    else:
        logits = load_array(logits_file, key=files.logits_key, source=source, field="--logits",
                            dtype=files.logits_dtype, option="--logits")
        labels = load_array(labels_file, key=files.labels_key, source=source, field="--labels",
                            dtype=files.labels_dtype, option="--labels")
    case = make_case(
        name=logits_file.name, logits=logits, labels=labels,
        family=loss, from_logits=not probabilities, reduction=reduction,
        ignore_index=ignore_index, label_smoothing=label_smoothing, source=str(logits_file),
        z_loss=options.z_loss, logit_softcap=options.logit_softcap,
        temperature=options.temperature,
        chunk_size=DEFAULT_CHUNK_SIZE if chunk_size is None else chunk_size,
    )
    return [Scenario(case, None, None, None, str(logits_file), {})]


def _evaluate(scenario: Scenario, dtypes: list[str], pipelines: list[str], accumulate: str,
              override: ToleranceSpec | None,
              functions: Sequence[UserFunction] = ()) -> ScenarioResult:
    case = scenario.case
    precisions = _precisions(dtypes, scenario.dtypes or DEFAULT_DTYPES, accumulate)
    named = pipelines or list(scenario.pipelines or ())
    chosen = select(case.spec.family, case.spec.from_logits, named)
    _refuse_named_pairs(chosen, precisions, bool(named), bool(dtypes or scenario.dtypes),
                        case.source)
    if not named and case.classes > execution.BLOCK_ELEMENTS:
        # a row this wide runs in column chunks, bounded in memory; a default pipeline that
        # cannot replay over chunks would hold the whole row: it runs only when named
        whole = [p.name for p in chosen if not p.splittable]
        chosen = tuple(p for p in chosen if p.splittable)
        if whole:
            click.echo(f"xentcheck: note: {case.source}: {', '.join(whole)} left out of the "
                       f"default set for rows of {case.classes} classes (it would hold a whole "
                       f"row in memory); name it with --pipeline to run it", err=True)
    chosen = with_functions(chosen, (*scenario.functions, *functions), case.spec.family,
                            case.spec.from_logits, case.logits.ndim)
    spec = override or scenario.tolerance
    tolerances = None
    if spec is not None:
        tolerances = {
            p.name: spec.for_dtype(p.name, Tolerance(rel=p.default_rel_tolerance()))
            for p in precisions
        }
    with progress_bar(case, len(precisions) * len(chosen)) as progress:
        result = evaluate(case, precisions, chosen, tolerances, progress)
    for item in result.left_out:
        _note(f"{case.source}: {item.pipeline} left out in {item.dtype}: {item.reason}")
    return result


def _refuse_named_pairs(pipelines: Sequence[Pipeline], precisions: Sequence[Precision],
                        pipelines_named: bool, dtypes_named: bool, source: str) -> None:
    """A pipeline that does not run in a dtype (a framework in float8) is left out with a
    note, unless both were named: then it is a usage error."""
    if not (pipelines_named and dtypes_named):
        return
    for item in left_out(pipelines, precisions):
        raise UsageError(f"{source}: {item.pipeline} does not run in {item.dtype}: "
                         f"{item.reason}")


def _report(checked: list[Checked], output_format: str, output: str | None, *,
            summary_only: bool) -> None:
    """Build the whole report, then write it: never a half-printed table.

    ``table`` prints the findings (``run``) or one line per scenario (``check``). Other
    formats go to ``--output`` when given, with the one-line summary on the console;
    without ``--output`` they go to standard output (``github``: after the summary, which
    Actions shows as plain log lines).
    """
    results = [c.result for c in checked]
    verdicts = [c.verdict for c in checked]

    def summary(console: Console) -> None:
        for item in checked:
            render_verdict(item.result, item.verdict, console)

    if output_format == "table":
        if summary_only:
            _print_table(summary, output)
        else:
            _print_table(lambda console: render_table(results, console, verdicts), output)
        return
    renderers: dict[str, Callable[[], str]] = {
        "json": lambda: render_json(results, verdicts),
        "junit": lambda: render_junit(checked),
        "github": lambda: render_annotations(checked),
    }
    text = renderers[output_format]()
    if output_format == "github":
        _github_step_summary(checked)
    if output:
        _write(output, text)
        _print_table(summary, None)
        return
    if output_format == "github":
        _print_table(summary, None)
    click.echo(text, nl=False)


def _github_step_summary(checked: list[Checked]) -> None:
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as handle:
            handle.write(render_step_summary(checked))
    except OSError as exc:
        raise InputFailure(f"GITHUB_STEP_SUMMARY {path}: cannot write ({exc.strerror})") from None


def _write(output: str, text: str) -> None:
    try:
        Path(output).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise InputFailure(f"{output}: cannot write the report ({exc.strerror})") from None


def _limit_pipelines(families: Sequence[str], names: list[str]) -> list[Pipeline]:
    """The pipelines on logits named (those run by default when none is), in each family
    that has them; a name no family has is an error."""
    if not names:
        return [p for family in families for p in select(family, True, None)]
    chosen = [p for family in families for p in available(family, True, every=True)
              if p.name in names]
    unknown = [n for n in names if n not in {p.name for p in chosen}]
    if unknown:
        known = sorted({p.name for f in families for p in available(f, True, every=True)})
        raise UsageError(f"unknown pipeline {unknown[0]!r} on logits; choose from "
                         f"{', '.join(known)}")
    order = {name: i for i, name in enumerate(dict.fromkeys(names))}
    return sorted(chosen, key=lambda p: (families.index(p.family), order[p.name]))


@cli.command()
@click.option("--classes", "-C", type=click.IntRange(min=1), default=3, show_default=True,
              help="Number of classes C (the sum of C exponentials is what overflows).")
@click.option("--loss", type=click.Choice(["softmax", "sigmoid", "all"]), default="all",
              show_default=True, help="Loss family.")
@click.option("--dtype", "dtypes", multiple=True, metavar="NAME",
              help=f"Storage dtype(s): {', '.join(DTYPE_NAMES)} (default: "
                   f"{', '.join(DEFAULT_DTYPES)}).")
@click.option("--accumulate", type=click.Choice(ACCUMULATE_CHOICES), default="default",
              show_default=True, help="Reduction accumulate dtype.")
@click.option("--pipeline", "pipeline_names", multiple=True, metavar="NAME",
              help="Formulation(s), e.g. torch (default: those run by default).")
@loss_option_flags
@function_options
@output_options(FORMATS)
def limits(classes: int, loss: str, dtypes: tuple[str, ...], accumulate: str,
           pipeline_names: tuple[str, ...], z_loss: float, logit_softcap: float | None,
           temperature: float, loss_fns: tuple[str, ...], framework: str,
           show_traceback: bool, output_format: str, output: str | None) -> None:
    """Print where each formulation breaks, per precision, for C classes.

    The largest safe logit (all C logits equal) and the largest safe spread (a target that
    far below the other C - 1 logits), found by bisection on each pipeline and shown next to
    the closed form derived from the format; "agree" checks one against the other.

    A --loss-fn function's edges are found by bisection on the function itself (no
    closed form); it is run as a softmax loss unless --loss sigmoid.

    \b
    Examples:
      xentcheck limits
      xentcheck limits --classes 50257 --dtype float16,bfloat16
      xentcheck limits --classes 128256 --loss softmax --pipeline stable,torch
      xentcheck limits -C 3 --dtype float32 --loss-fn examples/numpy_textbook.py:loss
    """
    try:
        functions = load_functions(loss_fns, framework)
        precisions = _precisions(dtypes, DEFAULT_DTYPES, accumulate)
        families = ("softmax", "sigmoid") if loss == "all" else (loss,)
        options = _option_values(z_loss, logit_softcap, temperature)
        chosen = with_functions(_limit_pipelines(families, _names(pipeline_names)), functions,
                                 families[0], True)
        _refuse_named_pairs(chosen, precisions, bool(_names(pipeline_names)),
                            bool(_names(dtypes)), "limits")
        rows = limit_rows(chosen, precisions, classes, options)
        for item in left_out(chosen, precisions):
            _note(f"limits: {item.pipeline} left out in {item.dtype}: {item.reason}")
    except XentcheckError as exc:
        raise _failure(exc, show_traceback) from None
    _emit(output_format, output, lambda: render_limits_json(rows),
          lambda console: render_limits_table(rows, console))


@cli.command()
@click.option("--loss", type=click.Choice(["softmax", "sigmoid"]), default="softmax",
              show_default=True, help="Loss family.")
@click.option("--classes", "-C", type=click.IntRange(min=1), default=10, show_default=True,
              help="Number of classes (sigmoid: elements per row).")
@click.option("--pattern", type=click.Choice(PATTERNS), default="bottom", show_default=True,
              help="top/bottom: target at the largest/smallest of logits spaced from m to -m; "
                   "spread: a fixed spread below m; normal: m times N(0, 1).")
@click.option("--from", "start", type=FiniteFloat(), default=1.0, show_default=True,
              help="Smallest magnitude.")
@click.option("--to", "stop", type=FiniteFloat(), default=1e5, show_default=True,
              help="Largest magnitude.")
@click.option("--points", type=click.IntRange(min=2, max=1_000_000), default=200,
              show_default=True, help="Number of magnitudes.")
@click.option("--linear", is_flag=True, help="Space the magnitudes linearly (default: log).")
@click.option("--spread", type=FiniteFloat(minimum=0.0), default=10.0, show_default=True,
              help="The gap for --pattern spread.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for --pattern normal.")
@click.option("--plot", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Also write an image of error against magnitude, its format chosen by the "
                   "suffix: .png, .pdf, .svg, ... (needs matplotlib).")
@loss_option_flags
@evaluation_options
@function_options
@output_options(FORMATS)
def sweep(loss: str, classes: int, pattern: str, start: float, stop: float, points: int,
          linear: bool, spread: float, seed: int, plot: Path | None, z_loss: float,
          logit_softcap: float | None, temperature: float, dtypes: tuple[str, ...],
          pipelines: tuple[str, ...], accumulate: str, rtol: float | None, atol: float | None,
          loss_fns: tuple[str, ...], framework: str, show_traceback: bool,
          output_format: str, output: str | None) -> None:
    """Move the logits along a magnitude scale and show where each formulation breaks.

    For every pipeline and precision: the first magnitude where the loss is NaN or inf, the
    first where its error passes the tolerance, and a curve of the bits of error.

    \b
    Examples:
      xentcheck sweep --dtype float32
      xentcheck sweep --classes 32000 --pattern normal --to 1e3 --plot sweep.png
      xentcheck sweep --dtype float32 --pipeline naive --loss-fn examples/numpy_textbook.py:loss
    """
    try:
        functions = load_functions(loss_fns, framework)
        if plot is not None:
            plot_format(plot)  # before computing anything
        spec = SweepSpec(family=loss, classes=classes, pattern=pattern, start=start, stop=stop,
                         points=points, log_scale=not linear, spread=spread, seed=seed,
                         options=_option_values(z_loss, logit_softcap, temperature, loss))
        precisions = _precisions(dtypes, DEFAULT_DTYPES, accumulate)
        chosen = with_functions(select(loss, True, _names(pipelines)), functions, loss, True)
        _refuse_named_pairs(chosen, precisions, bool(_names(pipelines)), bool(_names(dtypes)),
                            "sweep")
        tolerances = None
        if rtol is not None or atol is not None:
            tolerances = {p.name: Tolerance(rel=rtol or 0.0, abs=atol or 0.0) for p in precisions}
        result = run_sweep(spec, precisions, chosen, tolerances)
        for item in left_out(chosen, precisions):
            _note(f"sweep: {item.pipeline} left out in {item.dtype}: {item.reason}")
        if plot is not None:
            write_sweep_plot(result, plot)
    except XentcheckError as exc:
        raise _failure(exc, show_traceback) from None
    _emit(output_format, output, lambda: render_sweep_json(result),
          lambda console: render_sweep_table(result, console))


@cli.command()
@click.argument("rule", required=False)
def explain(rule: str | None) -> None:
    """Explain a misuse rule, or list them all.

    \b
    Examples:
      xentcheck explain
      xentcheck explain XC201
      xentcheck explain label-out-of-range
    """
    try:
        text = explain_rule(rule)
    except XentcheckError as exc:
        raise InputFailure(str(exc)) from None
    width = known_width(sys.stdout)
    if width is not None:  # else a log: lines as long as they are
        text = "".join(f"{line}\n" for line in _wrap_explanation(text, width))
    click.echo(text, nl=False)


# A rule's summary starts after its id and name, two spaces on: lines wrap under it.
_SUMMARY = re.compile(r"^(\S+ {2,}\S+ {2,})")
_NARROWEST_SUMMARY = 24  # below this the summary wraps under the id instead


def _wrap_explanation(text: str, width: int) -> list[str]:
    """``explain``'s text wrapped at spaces to the terminal: never inside a rule's name
    (names hold hyphens), a listed rule's summary hanging under its start."""
    lines: list[str] = []
    for line in text.splitlines():
        if len(line) <= width:
            lines.append(line)
            continue
        match = _SUMMARY.match(line)
        hang = len(match.group(1)) if match else 0
        if match and width - hang < _NARROWEST_SUMMARY:  # the summary under the id
            lines.append(match.group(1).rstrip())
            line, hang = "    " + line[len(match.group(1)):], 4
        lines += textwrap.wrap(line, width, subsequent_indent=" " * hang,
                               break_long_words=False, break_on_hyphens=False)
    return lines


def _emit(output_format: str, output: str | None, json_text: Callable[[], str],
          table: Callable[[Console], None]) -> None:
    """A table or JSON report (``limits``, ``sweep``), to the terminal or ``--output``."""
    if output_format != "json":
        _print_table(table, output)
    elif output:
        _write(output, json_text())
    else:
        click.echo(json_text(), nl=False)


def _precisions(dtypes: Sequence[str], default: Sequence[str], accumulate: str) -> list[Precision]:
    """``--dtype`` values (or the default names), each once, with the accumulate policy."""
    names = _names(dtypes) or list(default)
    return [Precision(name, accumulate) for name in dict.fromkeys(names)]  # type: ignore[arg-type]


def _print_table(render: Callable[[Console], None], output: str | None) -> None:
    """Render a whole table first, then write it to the file or the terminal."""
    if output:
        with open(output, "w", encoding="utf-8") as handle:
            render(Console(file=handle, no_color=True, width=180, highlight=False))
        return
    console = make_console()
    with console.capture() as capture:
        render(console)
    # The console already decided about colour (terminal, NO_COLOR, FORCE_COLOR): keep click
    # from stripping the codes a forced-colour console produced.
    click.echo(capture.get(), nl=False, color=True)
