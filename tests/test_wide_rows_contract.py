"""What a pipeline written on another branch (a fused kernel, a framework's own order of
steps) needs for rows split across their classes: the Pipeline docstring's rules.

A test pipeline in the shape a fused log-softmax kernel takes: ``run.max``, then one fused
step ``exp(x - m)`` kept in float32, summed unrounded (``run.accumulate``, as a kernel's
float32 accumulator), then one fused ``x_t - m - log(s)`` rounded once. Run over a row
split into column chunks it must give the loss and events of the same row run whole, and
that loss must be the closed form evaluated by hand in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from xentcheck import chunking
from xentcheck.case import Case, LossSpec
from xentcheck.execution import PipelineRun, blocks
from xentcheck.pipelines import Block, Pipeline
from xentcheck.precision import FloatArray, Precision
from xentcheck.stages import StageRunner

CHUNK = 64
CLASSES = 600


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(chunking, "SUM_CHUNK", CHUNK)
    yield


class FusedLogSoftmax(Pipeline):
    name = "fused-test"
    family = "softmax"
    from_logits = True
    formula = "x_t - m - log(sum(exp(x - m))), one kernel"
    stages = ("cast", "shift", "exp", "sum", "log_softmax")

    def per_example(self, run: StageRunner, block: Block) -> FloatArray:
        x = run.cast("cast", block.logits)
        m = run.max("shift", x)
        e = run.fused("exp", lambda a, b: np.exp(a - b), x, m, round_result=False)
        total = run.accumulate(e, keepdims=True)  # float32, unrounded: a kernel's register
        run.watch_reduction("sum", total, e)
        target = run.gather("log_softmax", x, block.target)[:, None]
        loss = run.fused("log_softmax", lambda t, b, s: b + np.log(s) - t, target, m, total)
        return run.select("log_softmax", block.valid, loss[:, 0], 0.0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_a_fused_kernel_pipeline_is_identical_split_or_whole(dtype: str) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 4, (2, CLASSES)).astype(np.float32)
    x[1, 500] = 40.0  # float16's exp(x - m) is fine; the max sits in a later chunk
    labels = np.array([450, 3])
    case = Case("t", x, labels, "index", LossSpec(reduction="none"))
    precision = Precision(dtype)
    results = []
    for size in (CLASSES, 128):  # one row per block; whole, then in column chunks
        run = PipelineRun(FusedLogSoftmax(), precision)
        outcomes = [run.run_block(case, block) for block in blocks(case, size)]
        assert all((b.split is not None) == (size == 128) for b in blocks(case, size))
        results.append((np.concatenate([o.per_example for o in outcomes]),
                        [o.events for o in outcomes]))
    (whole, whole_events), (split, split_events) = results
    assert np.array_equal(split, whole) and split_events == whole_events
    # the closed form, by hand: float32 from values of D, the sum chunk-defined, one rounding
    d = Precision(dtype)
    xs = np.asarray(d.round(x), dtype=np.float32)
    m = xs.max(axis=-1, keepdims=True)
    s = chunking.row_sum(np.exp(xs - m), keepdims=True)
    expected = d.round(m[:, 0] + np.log(s[:, 0]) - xs[[0, 1], labels])
    assert np.array_equal(np.asarray(whole, dtype=np.float64),
                          np.asarray(expected, dtype=np.float64))
