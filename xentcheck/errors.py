"""Domain exceptions. The CLI turns each into one line on stderr and exit status 2."""

from __future__ import annotations


class XentcheckError(Exception):
    """Base class of every error xentcheck reports to the user."""


class InputError(XentcheckError):
    """Bad user input: a file, a scenario field, a shape, a label.

    ``source`` names the file (or ``<command line>``) and ``field`` the scenario key or
    array at fault, so that the one-line message points at what to fix.
    """

    def __init__(self, message: str, *, source: str | None = None, field: str | None = None,
                 cause: BaseException | None = None):
        self.message = message
        self.source = source
        self.field = field
        # the exception a user's code raised (a loss function's), kept through
        # :meth:`located` for ``--traceback``
        self.cause = cause
        super().__init__(str(self))

    def __str__(self) -> str:
        where = ": ".join(part for part in (self.source, self.field) if part)
        return f"{where}: {self.message}" if where else self.message

    def located(self, source: str | None = None, field: str | None = None) -> InputError:
        """The same error with a source and/or field filled in where still missing."""
        return InputError(
            self.message, source=self.source or source, field=self.field or field,
            cause=self.cause,
        )


class UsageError(XentcheckError):
    """A command-line option or combination of options that makes no sense."""
