"""Finding scenario files: the files named, and the scenarios in the folders named.

A folder search is meant to work on a whole repository (``xentcheck check .``): it skips
hidden folders, virtual environments and YAML files that are plainly something else.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

from .errors import InputError
from .scenario import NotAScenario, Scenario, load_scenarios


def find_scenarios(paths: Sequence[Path], note: Callable[[str], None]) -> list[Scenario]:
    """Every scenario in the files named, and in the .yaml/.yml files under the folders named.

    A file named is always read as a scenario file. A file found in a folder that is plainly
    not a scenario (a CI workflow: see :func:`~xentcheck.scenario.load_scenarios`) is
    skipped, and ``note`` is told why in one line.

    Raises
    ------
    InputError
        For a bad scenario, or a folder holding none.
    """
    loaded: list[Scenario] = []
    for path in paths:
        if not path.is_dir():
            loaded.extend(load_scenarios(path))  # which reports a missing file
            continue
        found = yaml_files(path)
        before = len(loaded)
        for file in found:
            try:
                loaded.extend(load_scenarios(file, found=True))
            except NotAScenario as skipped:
                note(f"skipped {skipped}")
        if len(loaded) == before:
            others = f" ({len(found)} other YAML files skipped)" if found else ""
            raise InputError(f"holds no scenario files{others}", source=str(path))
    return loaded


# Folders a search never enters besides hidden ones: installed packages, not scenarios.
SKIPPED_FOLDERS = ("node_modules", "site-packages", "__pycache__")


def yaml_files(folder: Path) -> list[Path]:
    """The .yaml/.yml files under ``folder``, skipping hidden files and folders (.git,
    .github) and virtual environments (a folder holding pyvenv.cfg, site-packages,
    node_modules): they hold configuration and other people's files."""
    files: list[Path] = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIPPED_FOLDERS
                   and not (Path(root) / d / "pyvenv.cfg").exists()]
        files.extend(Path(root) / name for name in names
                     if not name.startswith(".") and name.endswith((".yaml", ".yml")))
    return sorted(files)
