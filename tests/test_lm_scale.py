"""Language-model scale inputs: a 4096 x 131072 bfloat16 dump gets a progress bar on a
terminal (the decision, not its timing); streaming and memory are measured by
bench/bench_lm.py, the memory map of .safetensors files is tested in test_arrays.py."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from xentcheck.case import Case, LossSpec
from xentcheck.cli_output import progress_bar


def lm_case(rows: int, vocab: int) -> Case:
    # a read-only view of one value: the shape of a 1 GiB dump without its memory
    logits = np.broadcast_to(np.zeros((), dtype=ml_dtypes.bfloat16), (rows, vocab))
    return Case("lm", logits, np.zeros(rows, dtype=np.int64), "index", LossSpec())


def test_an_lm_dump_gets_a_progress_bar_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: stderr is a terminal
    pairs = 4 * 4  # the default run: four dtypes, the three textbook pipelines and torch
    with progress_bar(lm_case(4096, 131072), pairs) as progress:
        assert progress is not None
        progress(8, 4096)  # one block of 8 rows done
    with progress_bar(lm_case(2, 131072), pairs) as progress:
        assert progress is None  # a fraction of a second: no bar
    monkeypatch.setenv("TTY_COMPATIBLE", "0")  # a log, a pipe, a CI job
    with progress_bar(lm_case(4096, 131072), pairs) as progress:
        assert progress is None
