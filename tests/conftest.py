"""Shared test helpers."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import mpmath
import pytest


@pytest.fixture(autouse=True)
def _mpmath_precision(request: pytest.FixtureRequest) -> Iterator[None]:
    """Every test runs at its module's mpmath precision (``MPMATH_PREC`` bits or
    ``MPMATH_DPS`` digits; 50 digits by default), restored afterwards. A module that set
    mpmath's global precision when imported would set it for the modules collected before
    it, and a test that sets it would set it for every later test."""
    bits = getattr(request.module, "MPMATH_PREC", None)
    digits = getattr(request.module, "MPMATH_DPS", 50)
    with mpmath.workprec(bits) if bits is not None else mpmath.workdps(digits):
        yield


@pytest.fixture
def write(tmp_path: Path) -> Callable[[str, str], Path]:
    """Write a text file under the test's temporary folder and return its path."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        return path

    return _write
