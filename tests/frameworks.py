"""Importing a framework for a live test: skipped where it is not installed, except where the
environment variable XENTCHECK_REQUIRE_FRAMEWORKS is set (CI sets it), where a missing
framework is a failure."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest

REQUIRE = "XENTCHECK_REQUIRE_FRAMEWORKS"


def require(name: str) -> ModuleType:
    """The module ``name``; the test is skipped if it cannot be imported, unless
    XENTCHECK_REQUIRE_FRAMEWORKS is set (then the import error fails the test)."""
    if os.environ.get(REQUIRE):
        return importlib.import_module(name)
    return pytest.importorskip(name)
