"""The ``jax`` pipelines against JAX/optax under ``jax.jit`` (CPU), bit for bit.

``fixtures/jax_optax.json`` holds what jax 0.10.2 / optax 0.2.8 compute for the user code
each case stands for (``fixtures/record_jax_optax.py`` shows that code and regenerates the
file): the reduced loss, the per-example losses and the gradient with respect to the logits,
in float16, bfloat16, float32 and float64. Every recorded value is compared with xentcheck's,
computed as the evaluator computes it, without jax.

In float16 and bfloat16 they are equal bit for bit, with the exceptions in
:data:`DIFFERENCES`. In float32 and float64 XLA's ``exp`` and ``log`` are its own
polynomials (1 to 3 float32 ulps from numpy's on 40% / 4% of inputs, measured) and its row
sums run in its own order, so results differ by a few ulps; the larger distances are
gradient entries that are differences of nearly equal terms. Each is listed with the
measured distance (in units of D's spacing; for hashed values, over the sampled entries).
"""

from __future__ import annotations

from functools import cache
from typing import Any

import numpy as np
import pytest
from frameworks import recording_script, require
from jax_fixture import (
    DTYPES,
    make_case,
    matches,
    recorded,
    ulp_distance,
    xentcheck_result,
)

from xentcheck.pipelines import available, select
from xentcheck.precision import Precision
from xentcheck.subnormals import flush_subnormals

KEYS = ("loss", "per_example", "grad")
ENTRIES = [(entry, dtype) for entry in recorded()["cases"] for dtype in DTYPES]
IDS = [f"{entry['name']}-{dtype}" for entry, dtype in ENTRIES]

# (case, dtype): the measured distances of (loss, per-example losses, gradient) from jax's, in
# units of D's spacing; every case and dtype not listed is equal bit for bit.
DIFFERENCES: dict[tuple[str, str], tuple[float, float, float]] = {
    ("probs_smoothing", "float16"): (0.0, 1.0, 12.0),
    ("sig_soft", "float16"): (0.0, 1.0, 2.0),
    ("smoothing_weights_ignore", "float16"): (0.0, 0.0, 5.0),
    ("smoothing_257x1000", "bfloat16"): (0.0, 1.0, 0.0),
    ("batch_257x1000", "float32"): (2.0, 2.0, 3.0),
    ("batch_257x1000_mean", "float32"): (0.0, 2.0, 4.0),
    ("bf16_divisor", "float32"): (1.0, 0.0, 1.0),
    ("bf16_extreme_spread", "float32"): (0.0, 0.0, 1.0),
    ("dense_masked", "float32"): (0.0, 0.0, 2.0),
    ("dense_tiny", "float32"): (1.0, 1.0, 1.0),
    ("ignore_257", "float32"): (1.0, 0.0, 1.0),
    ("ignore_mean", "float32"): (0.0, 0.0, 1.0),
    ("leading_dims", "float32"): (0.0, 0.0, 2.0),
    ("narrow_mean", "float32"): (1.0, 0.0, 5.0),
    ("narrow_none", "float32"): (0.0, 0.0, 5.0),
    ("narrow_sum", "float32"): (1.0, 0.0, 5.0),
    ("onehot", "float32"): (1.0, 0.0, 2.0),
    ("onehot_wide", "float32"): (0.0, 0.0, 2.0),
    ("probs", "float32"): (0.0, 2.0, 220.0),
    ("probs_16x32000", "float32"): (0.0, 1.0, 2.0),
    ("probs_257x1000", "float32"): (1.0, 2.0, 4.0),
    ("probs_none", "float32"): (2.0, 2.0, 220.0),
    ("probs_smoothing", "float32"): (0.0, 2.0, 10.0),
    ("probs_weights", "float32"): (0.0, 1.0, 7.0),
    ("shifted_logits", "float32"): (0.0, 0.0, 3.0),
    ("sig_257x1000", "float32"): (1.0, 1.0, 4.0),  # the mean of 257,000 losses: a chunk-defined sum
    ("sig_ignore", "float32"): (0.0, 2.0, 1.0),
    ("sig_narrow_mean", "float32"): (0.0, 3.0, 3.0),
    ("sig_narrow_none", "float32"): (3.0, 3.0, 2.0),
    ("sig_narrow_sum", "float32"): (0.0, 3.0, 2.0),
    ("sig_pos_weight", "float32"): (0.0, 3.0, 2.0),
    ("sig_soft", "float32"): (0.0, 3.0, 27.0),
    ("sig_tiny", "float32"): (1.0, 1.0, 1.0),
    ("sig_weights", "float32"): (0.0, 1.0, 2.0),
    ("sig_weights_ignore", "float32"): (1.0, 1.0, 3.0),
    ("sig_wide", "float32"): (0.0, 1.0, 1.0),
    ("smoothing", "float32"): (0.0, 1.0, 11.0),
    ("smoothing_257x1000", "float32"): (0.0, 3.0, 20.0),
    ("smoothing_ignore", "float32"): (2.0, 2.0, 1.0),
    ("smoothing_weights", "float32"): (0.0, 1.0, 42.0),
    ("smoothing_weights_ignore", "float32"): (0.0, 1.0, 38.0),
    ("spread_1e4", "float32"): (0.0, 0.0, 1.0),
    ("tiny", "float32"): (0.0, 0.0, 1.0),
    ("vocab_257x32000", "float32"): (1.0, 2.0, 1.0),
    ("vocab_64x32000_wide", "float32"): (2.0, 0.0, 2.0),
    ("weights_ignore", "float32"): (1.0, 2.0, 3.0),
    ("weights_mean", "float32"): (0.0, 0.0, 3.0),
    ("weights_none", "float32"): (2.0, 2.0, 4.0),
    ("weights_sum", "float32"): (0.0, 0.0, 2.0),
    ("wide_mean", "float32"): (0.0, 0.0, 2.0),
    ("wide_none", "float32"): (0.0, 0.0, 2.0),
    ("wide_sum", "float32"): (0.0, 0.0, 2.0),
    ("batch_257x1000", "float64"): (1.0, 1.0, 2.0),
    ("batch_257x1000_mean", "float64"): (1.0, 1.0, 2.0),
    ("bf16_divisor", "float64"): (1.0, 0.0, 0.0),
    ("bf16_extreme_spread", "float64"): (0.0, 0.0, 1.0),
    ("dense_masked", "float64"): (0.0, 0.0, 2.0),
    ("dense_tiny", "float64"): (0.0, 0.0, 1.0),
    ("ignore_257", "float64"): (1.0, 0.0, 0.0),
    ("ignore_mean", "float64"): (1.0, 0.0, 1.0),
    ("ignore_none", "float64"): (0.0, 0.0, 1.0),
    ("leading_dims", "float64"): (0.0, 0.0, 1.0),
    ("narrow_mean", "float64"): (1.0, 0.0, 2.0),
    ("narrow_none", "float64"): (0.0, 0.0, 2.0),
    ("narrow_sum", "float64"): (1.0, 0.0, 2.0),
    ("onehot", "float64"): (1.0, 14.0, 16.0),
    ("onehot_wide", "float64"): (0.0, 0.0, 3.0),
    ("probs", "float64"): (0.0, 1.0, 17.0),
    ("probs_16x32000", "float64"): (0.0, 1.0, 2.0),
    ("probs_257x1000", "float64"): (0.0, 2.0, 13.0),
    ("probs_none", "float64"): (1.0, 1.0, 17.0),
    ("probs_smoothing", "float64"): (0.0, 1.0, 7.0),
    ("probs_weights", "float64"): (0.0, 1.0, 6.0),
    ("shifted_logits", "float64"): (0.0, 0.0, 3.0),
    ("sig_257x1000", "float64"): (0.0, 1.0, 1.0),
    ("sig_ignore", "float64"): (1.0, 1.0, 0.0),
    ("sig_narrow_mean", "float64"): (0.0, 2.0, 2.0),
    ("sig_narrow_none", "float64"): (2.0, 2.0, 1.0),
    ("sig_narrow_sum", "float64"): (0.0, 2.0, 1.0),
    ("sig_pos_weight", "float64"): (2.0, 1.0, 2.0),
    ("sig_soft", "float64"): (0.0, 1.0, 9.0),
    ("sig_tiny", "float64"): (0.0, 0.0, 1.0),
    ("sig_weights", "float64"): (0.0, 1.0, 2.0),
    ("sig_weights_ignore", "float64"): (0.0, 1.0, 2.0),
    ("sig_wide", "float64"): (1.0, 1.0, 1.0),
    ("smoothing", "float64"): (0.0, 1.0, 7.0),
    ("smoothing_257x1000", "float64"): (0.0, 4.0, 23.0),
    ("smoothing_far", "float64"): (1.0, 0.0, 1.0),
    ("smoothing_ignore", "float64"): (0.0, 0.0, 1.0),
    ("smoothing_weights", "float64"): (0.0, 1.0, 22.0),
    ("smoothing_weights_ignore", "float64"): (0.0, 1.0, 20.0),
    ("ties", "float64"): (0.0, 0.0, 1.0),
    ("tiny", "float64"): (0.0, 0.0, 1.0),
    ("tiny_none", "float64"): (0.0, 0.0, 1.0),
    ("vocab_257x32000", "float64"): (1.0, 1.0, 2.0),
    ("vocab_64x32000_wide", "float64"): (0.0, 0.0, 2.0),
    ("weights_ignore", "float64"): (0.0, 0.0, 2.0),
    ("weights_mean", "float64"): (0.0, 0.0, 3.0),
    ("weights_none", "float64"): (2.0, 2.0, 3.0),
    ("weights_sum", "float64"): (0.0, 0.0, 3.0),
    ("wide_mean", "float64"): (0.0, 0.0, 3.0),
    ("wide_none", "float64"): (0.0, 0.0, 3.0),
    ("wide_sum", "float64"): (0.0, 0.0, 3.0),
}


@cache
def _mine(name: str, dtype: str) -> dict[str, np.ndarray]:
    entry = next(e for e in recorded()["cases"] if e["name"] == name)
    return xentcheck_result(make_case(entry), dtype)


def _compare(entry: dict[str, Any], dtype: str, want: dict[str, Any],
             mine: dict[str, np.ndarray]) -> None:
    """Bit for bit, or (listed cases) exactly the measured distances."""
    key = (entry["name"], dtype)
    equal = [matches(want[k], mine[k], dtype) for k in KEYS]
    if key not in DIFFERENCES:
        assert all(equal), {k: ulp_distance(want[k], mine[k], dtype) for k in KEYS}
        return
    assert not all(equal), "now equal bit for bit: remove it from DIFFERENCES"
    measured = tuple(ulp_distance(want[k], mine[k], dtype) for k in KEYS)
    assert measured == DIFFERENCES[key]


@pytest.mark.parametrize(("entry", "dtype"), ENTRIES, ids=IDS)
def test_xentcheck_computes_what_jax_computes(entry: dict[str, Any], dtype: str) -> None:
    _compare(entry, dtype, entry["jax"][dtype], _mine(entry["name"], dtype))


def _recorded(name: str, dtype: str) -> dict[str, Any]:
    entry = next(e for e in recorded()["cases"] if e["name"] == name)
    result: dict[str, Any] = entry["jax"][dtype]
    return result


def test_jnp_mean_accumulates_in_float32_and_jnp_sum_overflows_float16() -> None:
    """2000 float16 rows of loss 40: jnp.mean sums in float32 (80000) and scales by 1/2000:
    40, where F.cross_entropy's float16 nll_loss sum is inf; jnp.sum stores 80000 in float16:
    inf."""
    assert float.fromhex(_recorded("issue_overflow_mean", "float16")["loss"]) == 40.0
    assert float.fromhex(_recorded("issue_overflow_sum", "float16")["loss"]) == np.inf
    assert float(_mine("issue_overflow_mean", "float16")["loss"]) == 40.0
    assert float(_mine("issue_overflow_sum", "float16")["loss"]) == np.inf


def test_a_divided_mean_rounds_its_bfloat16_divisor_and_jnp_mean_does_not() -> None:
    """257 rows of loss log(1 + e): jnp.mean multiplies by float32 1/257; the user's
    ``jnp.sum(loss) / count`` with one row ignored divides by 257 stored in bfloat16, 256."""
    plain = float.fromhex(_recorded("bf16_divisor", "bfloat16")["loss"])
    divided = float.fromhex(_recorded("ignore_257", "bfloat16")["loss"])
    row = float.fromhex(_recorded("bf16_divisor", "bfloat16")["per_example"][0])
    bf16 = Precision("bfloat16")
    total = float(bf16.round(np.float32(257 * row)))
    assert plain == float(bf16.round(np.float32(257 * row) * (np.float32(1) / np.float32(257))))
    assert divided == float(bf16.round(np.float32(total) / np.float32(256)))
    assert divided != plain


def test_bfloat16_gradients_below_the_normal_range_are_flushed_to_zero() -> None:
    """XLA's CPU code flushes subnormals: with logits spread by up to 150, softmax entries
    between bfloat16's smallest subnormal (2**-133) and smallest normal (2**-126) are 0 in
    jax's bfloat16 gradient (recorded, and xentcheck's: the comparison above pins them
    equal), where a correctly rounded one is subnormal."""
    entry = next(e for e in recorded()["cases"] if e["name"] == "wide_none")
    case = make_case(entry)
    x = np.asarray(Precision("bfloat16").round(case.logits), dtype=np.float64)
    p = np.exp(x - x.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    between = (p > 2.0**-132) & (p < 2.0**-127)
    between[np.arange(len(x)), case.labels] = False  # a target's entry is p - 1
    grad = _mine("wide_none", "bfloat16")["grad"]
    assert between.sum() > 10
    assert np.all(grad[between] == 0)
    assert matches(entry["jax"]["bfloat16"]["grad"], grad, "bfloat16")


def test_flush_subnormals_against_the_formats_smallest_normals() -> None:
    import ml_dtypes

    tiny32 = np.finfo(np.float32).tiny
    values = np.array([tiny32, tiny32 / 2, -tiny32 / 4, 0.0, -0.0, 1.0], dtype=np.float32)
    out = flush_subnormals(values)
    assert out.tolist() == [tiny32, 0.0, 0.0, 0.0, 0.0, 1.0]
    assert np.signbit(out).tolist() == [False, False, True, False, True, False]
    bf16 = np.array([2.0**-130, 2.0**-126], dtype=ml_dtypes.bfloat16)
    assert flush_subnormals(bf16).astype(np.float64).tolist() == [0.0, 2.0**-126]
    f64 = np.array([5e-324, 2.3e-308])
    assert flush_subnormals(f64).tolist() == [0.0, 2.3e-308]
    f16 = np.array([2.0**-24], dtype=np.float16)  # float16 arithmetic is float32's: kept
    assert flush_subnormals(f16).tolist() == [2.0**-24]


def test_framework_pipelines_run_when_named() -> None:
    assert "jax" not in {p.name for p in available("softmax", True)}
    [softmax] = select("softmax", True, ["jax"])
    [sigmoid] = select("sigmoid", True, ["jax"])
    assert (softmax.family, sigmoid.family) == ("softmax", "sigmoid")


# -- live ------------------------------------------------------------------------------------

LIVE = ("wide_none", "weights_ignore", "probs", "sig_pos_weight", "batch_257x1000")


def _live_entries() -> list[tuple[dict[str, Any], str]]:
    return [(e, d) for e, d in ENTRIES if e["name"] in LIVE]


@pytest.mark.parametrize(("entry", "dtype"), _live_entries(),
                         ids=[f"{e['name']}-{d}" for e, d in _live_entries()])
def test_live_jax_agrees_with_xentcheck_and_the_fixture(entry: dict[str, Any],
                                                        dtype: str) -> None:
    jax = require("jax")
    require("optax")
    recorder = recording_script("record_jax_optax")
    x64 = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)  # float64 arrays stay float64
    try:
        live = recorder.record_case(entry, dtype)
    finally:
        jax.config.update("jax_enable_x64", x64)  # other tests' jax keeps its default
    from jax_fixture import summarise

    want = {k: summarise(v, dtype) for k, v in live.items()}
    _compare(entry, dtype, want, _mine(entry["name"], dtype))
    if dtype in ("float16", "bfloat16"):  # the fixture is what this jax computes
        for k in KEYS:
            assert matches(entry["jax"][dtype][k], live[k], dtype), k


def test_a_scenario_can_run_and_expect_the_jax_pipeline(tmp_path: Any) -> None:
    """``pipelines: [jax]`` runs it; an expectation may name it (it applies to the loss)."""
    from click.testing import CliRunner

    from xentcheck.cli import cli

    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "logits: [[0, -40], [0, -40]]\nlabels: [1, 1]\npipelines: [stable, jax]\n"
        "dtypes: float16\nreduction: sum\nexpect:\n  - pipeline: jax\n    loss: finite\n"
        "    max_ulp_error: 0\n", encoding="utf-8")
    result = CliRunner().invoke(cli, ["check", str(scenario)])
    assert result.exit_code == 0, result.output
    assert "2 checks hold" in result.output
