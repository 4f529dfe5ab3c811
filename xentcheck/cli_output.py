"""What the commands write: the report, built whole and then printed or written to
``--output``; notes and the progress bar on stderr; the console, sized and coloured for
whoever reads it."""

from __future__ import annotations

import os
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
from rich.progress import Progress as RichProgress

from .case import Case
from .cli_errors import InputFailure
from .evaluator import Progress
from .expectations import Checked
from .report_github import render_annotations, render_step_summary
from .report_json import render_json
from .report_junit import render_junit
from .report_table import render_table, render_verdict


def note(message: str) -> None:
    """``xentcheck: note: <message>`` on stderr (what was left out, and why)."""
    click.echo(f"xentcheck: note: {message}", err=True)


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


def report(checked: list[Checked], output_format: str, output: str | None, *,
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
            print_table(summary, output)
        else:
            print_table(lambda console: render_table(results, console, verdicts), output)
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
        print_table(summary, None)
        return
    if output_format == "github":
        print_table(summary, None)
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


# A rule's summary starts after its id and name, two spaces on: lines wrap under it.
_SUMMARY = re.compile(r"^(\S+ {2,}\S+ {2,})")
_NARROWEST_SUMMARY = 24  # below this the summary wraps under the id instead


def wrap_explanation(text: str, width: int) -> list[str]:
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


def emit(output_format: str, output: str | None, json_text: Callable[[], str],
         table: Callable[[Console], None]) -> None:
    """A table or JSON report (``limits``, ``sweep``), to the terminal or ``--output``."""
    if output_format != "json":
        print_table(table, output)
    elif output:
        _write(output, json_text())
    else:
        click.echo(json_text(), nl=False)


def print_table(render: Callable[[Console], None], output: str | None) -> None:
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
