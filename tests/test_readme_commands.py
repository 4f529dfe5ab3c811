"""Every ``xentcheck`` command the README shows runs, as written, in a folder holding the
shipped configs and the example files the README names (made here from numbers, not
committed): exit status 0 or 1, never 2 (a usage or input error)."""

from __future__ import annotations

import glob
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from xentcheck.cli import cli

ROOT = Path(__file__).resolve().parent.parent


def readme_commands() -> list[str]:
    """The ``xentcheck ...`` lines of the README's console and yaml blocks."""
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```(?:console|yaml)\n(.*?)```", text, flags=re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    commands = []
    for line in lines:
        line = re.sub(r"^(entry|run): ", "", line)  # pre-commit / Actions steps
        if line.startswith("xentcheck "):
            commands.append(line.split("  #")[0].split(" # ")[0].strip())
    return commands


def write_examples(folder: Path) -> None:
    """The files the README's examples name, small and deterministic."""
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal((16, 10)) * 4).astype(np.float32)
    labels = rng.integers(0, 10, 16)
    for name in ("logits", "dump"):
        np.save(folder / f"{name}.npy", logits)
    for name in ("labels", "targets"):
        np.save(folder / f"{name}.npy", labels)
    from safetensors.numpy import save_file

    save_file({"logits": logits, "labels": labels}, str(folder / "dump.safetensors"))
    header = ",".join(f"c{i}" for i in range(10)) + ",label"
    rows = [",".join(map(str, row)) + f",{label}" for row, label in zip(logits, labels,
                                                                         strict=True)]
    (folder / "batch.csv").write_text("\n".join([header, *rows]) + "\n")
    scenario = (ROOT / "configs" / "lm_batch_padding.yaml").read_text()
    for name in ("scenario.yaml", "model_dump.yaml"):
        (folder / name).write_text(scenario)


COMMANDS = readme_commands()


def test_the_readme_shows_commands() -> None:
    assert len(COMMANDS) >= 10


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_runs(command: str, tmp_path: Path,
                             monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    write_examples(tmp_path)
    monkeypatch.chdir(tmp_path)
    words = shlex.split(command)[1:]
    args = [match for word in words
            for match in (sorted(glob.glob(word)) if "*" in word else [word])]
    result = CliRunner().invoke(cli, args)
    assert result.exception is None or isinstance(result.exception, SystemExit), \
        result.exception
    assert result.exit_code in (0, 1), result.output
