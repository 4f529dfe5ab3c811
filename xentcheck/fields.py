"""Checked values of scenario keys and loss options: a value of the wrong kind is one
:class:`~xentcheck.errors.InputError` naming its field."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import InputError
from .precision import FloatArray


def string(value: Any, key: str) -> str:
    """``value``, which must be a string."""
    if not isinstance(value, str):
        raise InputError("must be a string", field=key)
    return value


def choice(value: Any, choices: tuple[str, ...], key: str) -> Any:
    """``value``, which must be one of ``choices``."""
    if value not in choices:
        raise InputError(f"{value!r} is not one of {', '.join(choices)}", field=key)
    return value


def boolean(value: Any, key: str) -> bool:
    """``value``, which must be a YAML boolean (true or false)."""
    if not isinstance(value, bool):
        raise InputError("must be true or false", field=key)
    return value


def names(value: Any, key: str) -> tuple[str, ...] | None:
    """A name or a non-empty list of names, each once (None: not given)."""
    if value is None:
        return None
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or not all(isinstance(v, str) for v in items):
        raise InputError("must be a name or a non-empty list of names", field=key)
    return tuple(dict.fromkeys(items))


def number(value: Any, key: str) -> float:
    """A finite int or float (not a boolean), as a float."""
    # YAML's `yes`/`true` are bools, a subclass of int: refuse them as numbers.
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"must be a number, not {value!r}", field=key)
    if not math.isfinite(value):
        raise InputError("must be finite", field=key)
    return float(value)


def inline_array(value: Any, key: str) -> FloatArray:
    """A YAML number or nested list as a float64 (or, all-integer, int64) array."""
    def check(item: Any) -> None:
        if isinstance(item, list):
            for sub in item:
                check(sub)
        elif isinstance(item, bool) or not isinstance(item, (int, float)):
            raise InputError(f"holds {item!r}, which is not a number", field=key)

    check(value)
    try:
        array = np.array(value)
    except ValueError:
        raise InputError("rows of different lengths (the nested lists must be rectangular)",
                         field=key) from None
    if array.dtype == object:
        raise InputError("rows of different lengths (the nested lists must be rectangular)",
                         field=key)
    return array if array.dtype.kind in "iu" else array.astype(np.float64)
