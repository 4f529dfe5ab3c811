"""StageRunner.fused: a fused kernel's step rounds to D once (or not at all), and is watched."""

from __future__ import annotations

import numpy as np

from xentcheck.precision import Precision
from xentcheck.stages import StageRunner


def runner(dtype: str, rows: int = 1) -> StageRunner:
    return StageRunner(Precision(dtype), ("fused",)).bind(np.ones(rows, dtype=bool))


def test_a_fused_step_rounds_once_where_steps_round_each_time() -> None:
    # x - m - log(s) in float32, rounded to float16 once, against three roundings
    d = Precision("float16")
    rng = np.random.default_rng(3)
    x = d.round(rng.normal(0, 8, (1, 1000)))  # operands are values of D, as a pipeline's are
    m, s = d.round(np.float64(3.3)), d.round(np.float64(1.37))
    run = runner("float16")
    fused = run.fused("fused", lambda a, b, c: a - b - np.log(c), x, m, s)
    x32, m32, s32 = (np.asarray(v, dtype=np.float32) for v in (x, m, s))
    once = (x32 - m32 - np.log(s32)).astype(np.float16)
    assert np.array_equal(np.asarray(fused).astype(np.float16), once)
    stepwise = run.subtract("fused", run.subtract("fused", x, m), run.log("fused", s))
    assert not np.array_equal(np.asarray(stepwise).astype(np.float16), once)


def test_an_unrounded_fused_value_stays_in_the_compute_dtype() -> None:
    run = runner("bfloat16")
    out = run.fused("fused", np.exp, np.array([[0.3, -1.1]]), round_result=False)
    assert out.dtype == np.float32
    assert np.array_equal(out, np.exp(np.array([[0.3, -1.1]], dtype=np.float32)))


def test_a_fused_step_that_overflows_d_is_recorded() -> None:
    # exp(12) = 162754.8 is a float32 number but past float16's range: the stored result
    # is inf, from finite operands: an overflow at the fused step
    run = runner("float16")
    out = run.fused("fused", np.exp, np.array([[1.0, 12.0]]))
    assert np.isinf(out[0, 1])
    [event] = run.events
    assert (event.stage, event.kind, event.index) == ("fused", "overflow", (0, 1))
