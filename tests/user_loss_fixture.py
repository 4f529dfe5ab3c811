"""Loading the user-loss modules of ``tests/user_losses/`` as ``--loss-fn`` would: from their
file, and finding the line of a call in them (so no test hard-codes a line number)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

LOSSES = Path(__file__).parent / "user_losses"


def load(name: str) -> tuple[ModuleType, Path]:
    """The module ``tests/user_losses/<name>.py`` and its path."""
    path = LOSSES / f"{name}.py"
    return load_file(path), path


def line_of(path: Path, text: str) -> str:
    """``FILE:LINE`` of the one line of ``path`` that contains ``text``."""
    lines = [i for i, line in enumerate(path.read_text().splitlines(), 1) if text in line]
    assert len(lines) == 1, (text, lines)
    return f"{path}:{lines[0]}"


def load_file(path: Path) -> ModuleType:
    """The module of the file ``path`` (an example's), as ``--loss-fn FILE.py:NAME`` loads."""
    spec = importlib.util.spec_from_file_location(f"user_loss_{path.stem}", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
