"""The project documents its own contracts: every scenario key, expectation key, JSON key and
flag the program knows or emits is named in docs/, and nothing points to a document the
repository does not ship."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from xentcheck import expectations, scenario
from xentcheck.cli import cli
from xentcheck.findings import FLAGS, GRAD_FLAGS

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))
# Keys whose children are named by data (dtype names), not by the schema.
DATA_KEYED = {"rounded"}


def documented(page: str) -> set[str]:
    """Every name written as inline code in a docs page."""
    return set(re.findall(r"`([^`\s]+)`", (DOCS / page).read_text()))


def keys(document: Any, parent: str = "") -> Iterator[str]:
    if isinstance(document, dict):
        for key, value in document.items():
            if parent not in DATA_KEYED:
                yield key
            yield from keys(value, key)
    elif isinstance(document, list):
        for item in document:
            yield from keys(item, parent)


def report(*args: str) -> Any:
    result = CliRunner().invoke(cli, [*args, "--format", "json"])
    assert result.exit_code in (0, 1), result.output
    return json.loads(result.output)


def test_every_scenario_and_expectation_key_is_documented() -> None:
    names = documented("scenarios.md")
    missing = [k for k in (*scenario.KEYS, *expectations.KEYS) if k not in names]
    assert not missing


@pytest.mark.parametrize("args", [
    ["run", *map(str, CONFIGS)],
    ["check", str(ROOT / "configs")],
    ["limits", "--classes", "10"],
    ["sweep", "--points", "5"],
], ids=["run", "check", "limits", "sweep"])
def test_every_json_key_is_documented(args: list[str]) -> None:
    names = documented("json-report.md")
    missing = sorted(set(keys(report(*args))) - names)
    assert not missing


def test_every_flag_is_documented() -> None:
    names = documented("json-report.md")
    assert not [f for f in (*FLAGS, *GRAD_FLAGS) if f not in names]


def test_nothing_points_to_an_unshipped_design_document() -> None:
    texts = [ROOT / "README.md", *DOCS.glob("*.md"), *(ROOT / "xentcheck").glob("*.py"),
             *(ROOT / "tests").glob("*.py")]
    offenders = [p.name for p in texts
                 if p.name != "test_docs.py" and "DESIGN.md" in p.read_text()]
    assert not offenders


def test_docs_links_resolve() -> None:
    for page in [ROOT / "README.md", *DOCS.glob("*.md")]:
        for target in re.findall(r"\]\(([^)#:]+)\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}"
