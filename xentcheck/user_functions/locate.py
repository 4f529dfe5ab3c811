"""Where in the user's file: frames matched to the file a ``--loss-fn`` names, and the one-line
error for a user's function that raised or returned the wrong thing."""

from __future__ import annotations

import os
import traceback
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError


def same_file(user_file: Path | None) -> Callable[[str], bool]:
    """A test of a frame's file name against the user's file (real paths compared, so a
    relative and an absolute spelling of one file agree); never true without a file."""
    if user_file is None:
        return lambda name: False
    target = os.path.realpath(user_file)
    cache: dict[str, bool] = {}

    def test(name: str) -> bool:
        if name not in cache:
            cache[name] = os.path.realpath(name) == target
        return cache[name]

    return test


def source(user_file: Path | None, line: int | str | None) -> str | None:
    """``FILE:LINE``, the file spelled as the user's SPEC gave it."""
    return f"{user_file}:{line}" if user_file is not None and line is not None else None


def user_line_of_exception(exc: BaseException, user_file: Path | None) -> str | None:
    """``FILE:LINE`` of the innermost frame of ``exc``'s traceback in the user's file."""
    in_user = same_file(user_file)
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if in_user(f.filename)]
    return source(user_file, frames[-1].lineno) if frames else None


def raised(exc: BaseException, user_file: Path | None, during: str) -> InputError:
    """The one-line error for a user's function that raised: the exception's type, the
    first line of its message and the user's ``FILE:LINE``."""
    where = user_line_of_exception(exc, user_file)
    text = str(exc).strip()
    message = f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
    return InputError(f"{during} raised {message}" + (f" at {where}" if where else ""))


def not_an_array(value: object, expected: str) -> InputError:
    """The error for a function that returned something other than the framework's array."""
    kind = type(value)
    return InputError(f"returned a {kind.__module__}.{kind.__qualname__}, not {expected}")


def wrong_shape(shape: tuple[int, ...], leading: tuple[int, ...],
                whole: tuple[int, ...]) -> InputError:
    """The error for losses of neither the logits' leading shape, nor their whole shape,
    nor a scalar's."""
    return InputError(f"returned shape {shape}; expected the logits' leading shape {leading} "
                      f"(one loss per example), their shape {whole} (one per element) or "
                      f"a scalar")
