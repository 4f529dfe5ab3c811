"""Live comparisons with the real libraries: run where the library is importable; where it is
not, skip -- except when XENTCHECK_REQUIRE_FRAMEWORKS is set (CI sets it), where a missing
library fails the test, so that a comparison CI was meant to run never passes by skipping."""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest


def require(name: str) -> ModuleType:
    """Import ``name`` for a live test, or skip (fail, when frameworks are required)."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        if os.environ.get("XENTCHECK_REQUIRE_FRAMEWORKS"):
            pytest.fail(f"{name} is required here (XENTCHECK_REQUIRE_FRAMEWORKS): {exc}")
        pytest.skip(f"{name} is not installed")


def recording_script(name: str) -> ModuleType:
    """The committed script ``tests/fixtures/<name>.py`` that records a fixture from the
    real library, loaded as a module (a live test reruns its recording functions)."""
    path = Path(__file__).parent / "fixtures" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
