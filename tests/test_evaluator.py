"""The evaluator's measurements against independent computations (mpmath, closed forms)."""

from __future__ import annotations

import math

import mpmath
import numpy as np
import pytest

from xentcheck import execution
from xentcheck.case import Case, LossSpec
from xentcheck.evaluator import evaluate
from xentcheck.findings import Finding, ScenarioResult
from xentcheck.pipelines import textbook
from xentcheck.precision import Precision, precisions_for

MPMATH_DPS = 50  # this module's tests run at it (conftest.py)
ALL = precisions_for(["float16", "bfloat16", "float32", "float64"])


def mp_nll(row: list[float], target: int) -> mpmath.mpf:
    """-log softmax(row)[target] at 50 digits, straight from the definition."""
    values = [mpmath.mpf(v) for v in row]
    return mpmath.log(mpmath.fsum(mpmath.exp(v) for v in values)) - values[target]


def finding(result: ScenarioResult, pipeline: str, dtype: str) -> Finding:
    return next(f for f in result.findings if f.pipeline == pipeline and f.dtype == dtype)


def softmax_case(logits: object, labels: object, **spec: object) -> Case:
    x = np.asarray(logits, dtype=np.float64)
    y = np.asarray(labels)
    kind = "index" if y.shape == x.shape[:-1] else "dense"
    return Case("t", x, y, kind, LossSpec(**spec))  # type: ignore[arg-type]


def test_ignore_index_rows_count_nowhere_in_the_mean() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(0, 3, (2, 5, 7))
    y = np.array([[1, 2, -100, 4, -100], [0, -100, 6, 6, 3]])
    result = evaluate(softmax_case(x, y, ignore_index=-100), ALL[3:], textbook("softmax", True))
    counted = [(b, s) for b in range(2) for s in range(5) if y[b, s] != -100]
    expected = mpmath.fsum(mp_nll(list(x[b, s]), int(y[b, s])) for b, s in counted) / len(counted)
    assert result.reference.loss == pytest.approx(float(expected), rel=4e-16)
    stable = finding(result, "stable", "float64")
    assert stable.loss == pytest.approx(float(expected), rel=8 * 2.2e-16)


def test_weighted_mean_divides_by_the_sum_of_target_weights() -> None:
    x = np.array([[3.2, -0.4, 0.1, -1.5], [0.2, 2.5, -0.3, -1.1], [-0.5, 0.1, 1.8, 0.4]])
    y = np.array([0, 1, 3])
    w = np.array([0.25, 1.0, 2.0, 4.0])
    result = evaluate(softmax_case(x, y, class_weights=w), ALL[3:], textbook("softmax", True))
    numerator = mpmath.fsum(mpmath.mpf(w[t]) * mp_nll(list(x[i]), int(t)) for i, t in enumerate(y))
    expected = numerator / mpmath.fsum(mpmath.mpf(w[t]) for t in y)
    assert result.reference.loss == pytest.approx(float(expected), rel=4e-16)


def test_label_smoothing_follows_pytorch() -> None:
    # F.cross_entropy(label_smoothing=e): (1 - e) * nll + e / C * sum_c(-log p_c)
    x = np.array([[2.0, -1.0, 0.5], [0.1, 0.2, 0.3]])
    y = np.array([0, 2])
    e = 0.1
    result = evaluate(softmax_case(x, y, label_smoothing=e), ALL[3:], textbook("softmax", True))
    per_row = []
    for i, t in enumerate(y):
        smooth = mpmath.fsum(mp_nll(list(x[i]), c) for c in range(3))
        nll = mp_nll(list(x[i]), int(t))
        per_row.append((1 - mpmath.mpf(e)) * nll + mpmath.mpf(e) / 3 * smooth)
    assert result.reference.loss == pytest.approx(float(mpmath.fsum(per_row) / 2), rel=4e-16)


def test_soft_labels_equal_the_weighted_sum_of_sparse_losses() -> None:
    x = np.array([[1.0, 2.0, 3.0]])
    y = np.array([[0.2, 0.3, 0.5]])
    result = evaluate(softmax_case(x, y), ALL[3:], textbook("softmax", True))
    expected = mpmath.fsum(mpmath.mpf(y[0, c]) * mp_nll([1.0, 2.0, 3.0], c) for c in range(3))
    assert result.reference.loss == pytest.approx(float(expected), rel=4e-16)


def test_input_rounding_is_told_apart_from_arithmetic_error() -> None:
    # bfloat16 has spacing 2 at 256: 257.5 is stored as 258, so the loss of the stored inputs
    # is softplus(2) rather than softplus(1.5), a 25% change, while stable's arithmetic on
    # the stored inputs is good to a few bfloat16 ulps.
    result = evaluate(softmax_case([256.0, 257.5], 0), ALL[1:2], textbook("softmax", True))
    assert result.reference.loss == pytest.approx(math.log1p(math.exp(1.5)), rel=1e-15)
    assert result.reference.rounded["bfloat16"] == pytest.approx(math.log1p(math.exp(2.0)))
    stable = finding(result, "stable", "bfloat16")
    assert "input_rounding" in stable.flags
    assert "precision_loss" not in stable.flags
    assert stable.abs_error == pytest.approx(
        abs(float(stable.loss or 0) - math.log1p(math.exp(1.5))), rel=1e-12
    )


def test_tiny_loss_is_flagged_as_precision_loss_in_float64() -> None:
    result = evaluate(softmax_case([0.0, -40.0], 0), ALL[3:], textbook("softmax", True))
    assert result.reference.loss == pytest.approx(4.2483542552915889e-18, rel=4e-16)
    stable = finding(result, "stable", "float64")
    assert stable.loss == 0.0
    assert stable.rel_error == 1.0
    assert stable.flags == ("precision_loss",)
    # ulp error: |0 - 4.248e-18| in units of float64's spacing at 4.248e-18 (2**-110)
    assert stable.ulp_error == pytest.approx(4.2483542552915889e-18 / 2.0**-110, rel=1e-12)


def test_mismatches_name_the_disagreeing_pipelines() -> None:
    result = evaluate(softmax_case([1000.0, 2000.0, 2500.0], 1), ALL[2:3],
                      textbook("softmax", True))
    pairs = {(m.pipelines, m.kind) for m in result.mismatches}
    # naive (NaN) and shifted (inf) are both broken: no finite value to compare, no mismatch.
    assert pairs == {(("naive", "stable"), "finiteness"), (("shifted", "stable"), "finiteness")}


def test_first_bad_index_is_in_the_inputs_own_coordinates() -> None:
    x = np.zeros((2, 3, 4))
    x[1, 2, 3] = 100.0  # exp(100) overflows float32 in the naive pipeline
    y = np.zeros((2, 3), dtype=np.int64)
    result = evaluate(softmax_case(x, y), ALL[2:3], textbook("softmax", True))
    naive = finding(result, "naive", "float32")
    assert naive.first_bad_stage == "exp"
    assert naive.first_bad is not None and naive.first_bad.kind == "overflow"
    assert naive.first_bad_index == [1, 2, 3]


def test_reduction_none_reports_every_example_and_the_worst() -> None:
    x = np.array([[0.0, -40.0], [1.0, 2.0]])
    result = evaluate(softmax_case(x, [0, 1], reduction="none"), ALL[3:],
                      textbook("softmax", True))
    assert result.reference.loss is None
    assert result.reference.per_example is not None
    assert result.reference.per_example[0] == pytest.approx(4.2483542552915889e-18, rel=4e-16)
    assert result.reference.per_example[1] == pytest.approx(math.log1p(math.exp(-1.0)), rel=4e-16)
    stable = finding(result, "stable", "float64")
    assert stable.loss is None and stable.per_example is not None
    assert stable.per_example.shape == (2,)
    assert stable.worst_index == (0,)  # the tiny loss is where all the digits are lost


def test_streaming_in_small_blocks_gives_identical_findings(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 40, (64, 9)).astype(np.float32)  # spreads large enough to break some
    y = rng.integers(0, 9, 64)
    y[5] = -100
    case = Case("s", x, y, "index", LossSpec(ignore_index=-100))
    whole = evaluate(case, ALL, textbook("softmax", True))
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", 9 * 5)  # 13 blocks of 5 rows
    streamed = evaluate(case, ALL, textbook("softmax", True))
    assert streamed.reference == whole.reference
    _assert_same_findings(whole, streamed)


def _assert_same_findings(whole: ScenarioResult, streamed: ScenarioResult) -> None:
    for a, b in zip(whole.findings, streamed.findings, strict=True):
        assert (a.flags, a.first_bad, a.events) == (b.flags, b.first_bad, b.events)
        assert (a.grad_flags, a.grad_first_bad) == (b.grad_flags, b.grad_first_bad)
        for field in ("loss", "abs_error", "rel_error", "ulp_error", "grad_error"):
            va, vb = getattr(a, field), getattr(b, field)
            assert va == vb or (math.isnan(va) and math.isnan(vb)), field
        np.testing.assert_array_equal(a.grad_row_errors, b.grad_row_errors)


@pytest.mark.parametrize("workers", [1, 3])
def test_blocks_on_several_threads_give_the_one_thread_findings(
    monkeypatch: pytest.MonkeyPatch, workers: int,
) -> None:
    from xentcheck import evaluator

    rng = np.random.default_rng(8)
    x = rng.normal(0, 40, (90, 7)).astype(np.float32)
    y = rng.integers(0, 7, 90)
    case = Case("t", x, y, "index", LossSpec())
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", 7 * 4)  # 23 blocks, merged in order
    monkeypatch.setattr(evaluator, "worker_count", lambda: 2)
    threaded = evaluate(case, ALL, textbook("softmax", True))
    monkeypatch.setattr(evaluator, "worker_count", lambda: workers)
    other = evaluate(case, ALL, textbook("softmax", True))
    assert threaded.reference == other.reference
    _assert_same_findings(threaded, other)
    assert any(f.first_bad is not None for f in threaded.findings)  # events to merge


def test_float16_sum_reduction_overflows_at_the_reduce_stage() -> None:
    # 100,000 examples each with loss log(2): the float32-accumulated sum, 69314.7, rounds
    # past float16's largest finite value 65504 to inf; the mean does not.
    x = np.zeros((100_000, 2))
    y = np.zeros(100_000, dtype=np.int64)
    p = [Precision("float16")]
    summed = evaluate(softmax_case(x, y, reduction="sum"), p, textbook("softmax", True)[2:])
    assert summed.findings[0].loss == math.inf
    assert summed.findings[0].first_bad_stage == "reduce"
    assert summed.findings[0].first_bad_index == []
    assert summed.reference.loss == pytest.approx(100_000 * math.log(2), rel=4e-16)
    mean = evaluate(softmax_case(x, y), p, textbook("softmax", True)[2:])
    assert mean.findings[0].loss == float(np.float16(math.log(2)))


def test_value_mismatch_reports_the_difference() -> None:
    # Keras' clip raises the target probability 1e-9 / 1.200000001 to 1e-7.
    p = np.array([[1e-9, 0.9, 0.3]])
    case = Case("p", p, np.array([0]), "index", LossSpec(from_logits=False))
    result = evaluate(case, ALL[3:], textbook("softmax", False))
    (mismatch,) = result.mismatches
    naive = -math.log(1e-9 / (1e-9 + 0.9 + 0.3))
    clipped = -math.log(1e-7)
    assert mismatch.pipelines == ("naive", "clipped") and mismatch.kind == "value"
    assert mismatch.losses == pytest.approx((naive, clipped), rel=1e-15)
    assert mismatch.difference == pytest.approx(naive - clipped, rel=1e-14)
    assert result.reference.loss == pytest.approx(naive, rel=1e-15)


def test_headroom_is_limit_minus_the_inputs_largest_logit() -> None:
    result = evaluate(softmax_case([1000.0, 2000.0, 2500.0], 1), ALL[2:3],
                      textbook("softmax", True))
    naive = finding(result, "naive", "float32")
    assert naive.limit.largest_safe_logit is not None
    assert naive.logit_headroom == naive.limit.largest_safe_logit - 2500.0
    assert naive.spread_headroom == (naive.limit.largest_safe_spread or 0.0) - 500.0


def test_five_dimensional_input_and_sigmoid_pos_weight() -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(0, 2, (2, 13, 13, 3, 20))
    y = rng.integers(0, 20, (2, 13, 13, 3))
    result = evaluate(softmax_case(x, y), ALL[3:], textbook("softmax", True))
    assert result.shape == (2, 13, 13, 3, 20) and result.classes == 20
    assert finding(result, "stable", "float64").flags == ()
    z = (rng.random((4, 3)) < 0.5).astype(np.float64)
    logits = rng.normal(0, 5, (4, 3))
    pw = np.array([1.0, 2.0, 0.5])
    case = Case("b", logits, z, "binary", LossSpec(family="sigmoid", pos_weight=pw))
    sig = evaluate(case, ALL[3:], textbook("sigmoid", True))
    s = 1 / (1 + np.exp(-logits))
    expected = np.mean(-(pw * z * np.log(s) + (1 - z) * np.log1p(-s)))
    assert sig.reference.loss == pytest.approx(float(expected), rel=1e-13)
    assert finding(sig, "stable", "float64").loss == pytest.approx(float(expected), rel=1e-13)


def test_flags_are_judged_value_by_value() -> None:
    # Element [0, 1]: 0.999999999 rounds to 1.0 in float32, so log(1 - p) of the stored input
    # is -inf for target 0 (input_rounding). Element [0, 0]: 1e-9 is a normal float32 but
    # clipping to 1e-7 gives -log(1e-7) = 16.12 instead of -log(1e-9) = 20.72 (precision_loss,
    # judged against the finite loss of the rounded input).
    p = np.array([[1e-9, 0.999999999]])
    z = np.array([[1.0, 0.0]])
    case = Case("s", p, z, "binary", LossSpec(family="sigmoid", from_logits=False,
                                              reduction="none"))
    result = evaluate(case, ALL[2:3], textbook("sigmoid", False))
    clipped = finding(result, "clipped", "float32")
    assert clipped.flags == ("precision_loss", "input_rounding")
    assert clipped.per_example is not None
    assert float(clipped.per_example[0, 0]) == float(-np.log(np.float32(1e-7)))
    assert np.float32(0.999999999) == np.float32(1.0)


def test_progress_is_reported_block_by_block(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", 4 * 10)  # blocks of 10 rows
    x = np.zeros((25, 4))
    seen: list[tuple[int, int]] = []
    evaluate(softmax_case(x, np.zeros(25, dtype=np.int64)), ALL[3:],
             textbook("softmax", True), progress=lambda done, total: seen.append((done, total)))
    assert seen == [(10, 25), (20, 25), (25, 25)]


def test_no_progress_bar_when_stderr_is_not_a_terminal() -> None:
    from xentcheck.cli_output import PROGRESS_WORK, progress_bar

    x = np.zeros((PROGRESS_WORK // 4 + 1, 4))
    case = softmax_case(x[:1], [0])
    case = Case("big", x, np.zeros(len(x), dtype=np.int64), "index", LossSpec())
    with progress_bar(case, 1) as progress:
        assert progress is None  # pytest captures stderr: not a terminal


def test_inputs_a_dtype_holds_are_not_rounded_again() -> None:
    import ml_dtypes

    from xentcheck.evaluator import _held_exactly, _rounded_case

    def held(x: np.ndarray, dtype: str, spec: LossSpec | None = None) -> bool:
        case = Case("h", x, np.zeros(len(x), dtype=np.int64), "index", spec or LossSpec())
        block = next(execution.blocks(case))
        return _held_exactly(block, Precision(dtype), _rounded_case(case, Precision(dtype)))

    x32 = np.array([[0.1, 2.0]], dtype=np.float32)
    assert held(x32, "float32") and held(x32, "float64")
    assert not held(x32, "float16") and not held(x32, "bfloat16")
    assert held(x32.astype(ml_dtypes.bfloat16), "bfloat16")
    assert held(x32.astype(np.float16), "float32") and not held(x32.astype(np.float16), "bfloat16")
    # weights are compared value by value: 0.1 is not a float32 number
    assert not held(x32, "float32", LossSpec(class_weights=np.array([0.1, 1.0])))
    assert held(x32, "float32", LossSpec(class_weights=np.array([0.5, 1.0])))


def test_blocks_in_flight_hold_at_most_three_default_blocks_of_values() -> None:
    default = execution.BLOCK_ELEMENTS
    assert execution.block_size(1) == default and execution.block_size(2) == default
    for workers in (3, 4):
        assert (workers + 1) * execution.block_size(workers) <= 3 * default
