"""The command line: the commands, thin over the library. Library errors become one line and
exit 2 (:mod:`xentcheck.cli_errors`); the shared options are in :mod:`xentcheck.cli_options`
and :mod:`xentcheck.cli_functions`, ``run``'s input files in :mod:`xentcheck.cli_inputs`, the
choice of pipelines and the evaluation in :mod:`xentcheck.cli_evaluation`, what is written in
:mod:`xentcheck.cli_output`."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import __version__
from .allocator import keep_freed_memory
from .arrays import RAW_DTYPES
from .case import DEFAULT_CHUNK_SIZE, LossOptions
from .cli_errors import InputFailure, OneLineErrors, failure
from .cli_evaluation import check_all, limit_pipelines, refuse_named_pairs
from .cli_functions import function_options, load_functions, with_functions
from .cli_inputs import InputFiles, input_scenarios
from .cli_options import (
    CHECK_FORMATS,
    FORMATS,
    FiniteFloat,
    evaluation_options,
    fail_on_option,
    loss_option_flags,
    loss_option_values,
    output_options,
    precisions_from,
    split_names,
)
from .cli_output import emit, known_width, note, report, wrap_explanation
from .discovery import find_scenarios
from .errors import XentcheckError
from .evaluator import left_out
from .findings import Tolerance
from .limits import limit_rows
from .misuse import explain as explain_rule
from .pipelines import select
from .plot import plot_format, write_sweep_plot
from .precision import ACCUMULATE_CHOICES, DEFAULT_DTYPES, DTYPE_NAMES
from .report_json import render_limits_json, render_sweep_json
from .report_table import render_limits_table, render_sweep_table
from .sweep import PATTERNS, SweepSpec, run_sweep


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
@click.option("--ignore-index", type=int, default=None,
              help="Label value that counts nowhere, for --logits.")
@click.option("--label-smoothing", type=float, default=0.0,
              help="Label smoothing (softmax), for --logits.")
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
        loaded = input_scenarios(scenarios, files, loss, probabilities, reduction, ignore_index,
                                 label_smoothing, LossOptions(temperature, logit_softcap, z_loss),
                                 chunk_size)
        checked = check_all(loaded, dtypes, pipelines, accumulate, rtol, atol, fail_on,
                            functions)
    except XentcheckError as exc:
        raise failure(exc, show_traceback) from None
    report(checked, output_format, output, summary_only=False)
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
        loaded = find_scenarios(paths or (Path("configs"),), note=note)
        checked = check_all(loaded, dtypes, pipelines, accumulate, rtol, atol, fail_on,
                            functions)
    except XentcheckError as exc:
        raise failure(exc, show_traceback) from None
    report(checked, output_format, output, summary_only=True)
    if not all(c.verdict.passed for c in checked):
        sys.exit(1)


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
        precisions = precisions_from(dtypes, DEFAULT_DTYPES, accumulate)
        families = ("softmax", "sigmoid") if loss == "all" else (loss,)
        options = loss_option_values(z_loss, logit_softcap, temperature)
        chosen = with_functions(limit_pipelines(families, split_names(pipeline_names)),
                                functions, families[0], True)
        refuse_named_pairs(chosen, precisions, bool(split_names(pipeline_names)),
                           bool(split_names(dtypes)), "limits")
        rows = limit_rows(chosen, precisions, classes, options)
        for item in left_out(chosen, precisions):
            note(f"limits: {item.pipeline} left out in {item.dtype}: {item.reason}")
    except XentcheckError as exc:
        raise failure(exc, show_traceback) from None
    emit(output_format, output, lambda: render_limits_json(rows),
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
                         options=loss_option_values(z_loss, logit_softcap, temperature, loss))
        precisions = precisions_from(dtypes, DEFAULT_DTYPES, accumulate)
        chosen = with_functions(select(loss, True, split_names(pipelines)), functions, loss, True)
        refuse_named_pairs(chosen, precisions, bool(split_names(pipelines)),
                           bool(split_names(dtypes)), "sweep")
        tolerances = None
        if rtol is not None or atol is not None:
            tolerances = {p.name: Tolerance(rel=rtol or 0.0, abs=atol or 0.0) for p in precisions}
        result = run_sweep(spec, precisions, chosen, tolerances)
        for item in left_out(chosen, precisions):
            note(f"sweep: {item.pipeline} left out in {item.dtype}: {item.reason}")
        if plot is not None:
            write_sweep_plot(result, plot)
    except XentcheckError as exc:
        raise failure(exc, show_traceback) from None
    emit(output_format, output, lambda: render_sweep_json(result),
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
        text = "".join(f"{line}\n" for line in wrap_explanation(text, width))
    click.echo(text, nl=False)
