"""How errors leave the command line: one line on stderr, ``xentcheck: error: ...``, and
exit status 2, for library input errors and click's usage errors alike."""

from __future__ import annotations

import traceback
from typing import Any

import click

from .errors import XentcheckError


class InputFailure(click.ClickException):
    """A XentcheckError at the edge: ``xentcheck: error: <message>`` and exit status 2."""

    exit_code = 2

    def show(self, file: Any = None) -> None:
        click.echo(f"xentcheck: error: {self.format_message()}", err=True)


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


def failure(exc: XentcheckError, show_traceback: bool) -> InputFailure:
    """The one-line error; with --traceback, the user's exception's traceback first."""
    cause = getattr(exc, "cause", None)
    if show_traceback and cause is not None:
        click.echo("".join(traceback.format_exception(cause)).rstrip("\n"), err=True)
    return InputFailure(str(exc))
