"""Gradients: the reference against mpmath and finite differences, each pipeline's backward
against the closed form, and the flags (NaN from log, zeroed entries)."""

from __future__ import annotations

import json

import mpmath
import numpy as np
import pytest

from xentcheck import reference as ref
from xentcheck.case import Case, LossSpec
from xentcheck.evaluator import evaluate
from xentcheck.execution import Denominators, PipelineRun, blocks
from xentcheck.pipelines import textbook
from xentcheck.precision import Precision, precisions_for
from xentcheck.report_json import render_json

MPMATH_DPS = 50  # this module's tests run at it (conftest.py)


def mp_loss(row: list[mpmath.mpf], a: list[float]) -> mpmath.mpf:
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in row))
    return mpmath.fsum(mpmath.mpf(ac) * (lse - xc) for ac, xc in zip(a, row, strict=True))


@pytest.mark.parametrize(("x", "a"), [
    ([1.0, 2.0, 3.0], [0.0, 1.0, 0.0]),
    ([0.0, -40.0], [1.0, 0.0]),  # p_t within e^-40 of 1: the target's entry is -4.2e-18
    ([1000.0, 1000.5, 999.0], [0.2, 0.5, 0.3]),
    ([5.0, 5.0], [0.0, 2.0]),
])
def test_softmax_reference_gradient_against_mpmath(x: list[float], a: list[float]) -> None:
    got = ref.softmax_gradients(np.array([x]), np.array([a]))[0]
    row = [mpmath.mpf(v) for v in x]
    for j in range(len(x)):
        # the derivative by mpmath's numerical differentiation at 50 digits
        def loss_j(t: mpmath.mpf, j: int = j) -> mpmath.mpf:
            return mp_loss([t if k == j else v for k, v in enumerate(row)], a)

        true = mpmath.diff(loss_j, row[j])
        assert abs(mpmath.mpf(got[j]) - true) <= 4 * np.spacing(abs(float(true))) + 1e-300


def test_sigmoid_reference_gradient_against_mpmath() -> None:
    x = np.array([-30.0, -1.0, 0.0, 0.5, 20.0])
    z = np.array([1.0, 0.3, 1.0, 0.0, 1.0])
    pw, w = 2.5, np.array([1.0, 2.0, 0.5, 1.0, 3.0])
    got = ref.sigmoid_gradients(x, z, np.array(pw), w)
    for i in range(len(x)):
        def loss(t: mpmath.mpf, i: int = i) -> mpmath.mpf:
            s = 1 / (1 + mpmath.exp(-t))
            q = 1 / (1 + mpmath.exp(t))
            return -w[i] * (pw * z[i] * mpmath.log(s) + (1 - z[i]) * mpmath.log(q))

        true = mpmath.diff(loss, mpmath.mpf(x[i]))
        assert abs(mpmath.mpf(got[i]) - true) <= 4 * np.spacing(abs(float(true)))


def pipeline_gradient(name: str, family: str, dtype: str, case: Case) -> np.ndarray:
    pipeline = next(p for p in textbook(family, True) if p.name == name)
    den = Denominators(np.zeros(case.classes))
    for block in blocks(case):
        den.add(case, block)
    run = PipelineRun(pipeline, Precision(dtype))
    parts = [run.gradient(case, block, den) for block in blocks(case)]
    return np.concatenate([np.asarray(p, dtype=np.float64) for p in parts if p is not None])


@pytest.mark.parametrize("name", ["naive", "shifted", "stable"])
def test_softmax_backward_is_the_weighted_mean_of_softmax_minus_target(name: str) -> None:
    # PyTorch: d/dx of mean-with-weights = w_t (softmax - onehot) / sum(w_t)
    rng = np.random.default_rng(4)
    x = rng.normal(0, 2, (6, 5))
    t = np.array([0, 1, 2, 3, 4, 0])
    w = np.array([1.0, 2.0, 0.5, 3.0, 1.5])
    case = Case("g", x, t, "index", LossSpec(class_weights=w))
    got = pipeline_gradient(name, "softmax", "float64", case)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    expected = (p - np.eye(5)[t]) * w[t][:, None] / w[t].sum()
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("name", ["naive", "stable"])
def test_sigmoid_backward_is_sigmoid_minus_target(name: str) -> None:
    x = np.array([[-2.0, 0.5], [1.0, 3.0]])
    z = np.array([[0.0, 1.0], [1.0, 0.25]])
    case = Case("g", x, z, "binary", LossSpec(family="sigmoid", reduction="sum"))
    got = pipeline_gradient(name, "sigmoid", "float64", case)
    np.testing.assert_allclose(got, 1 / (1 + np.exp(-x)) - z, rtol=1e-13)


def test_naive_gradient_is_nan_from_log_while_stable_is_exact() -> None:
    case = Case("o", np.array([[1000.0, 2000.0, 2500.0]]), np.array([1]), "index", LossSpec())
    result = evaluate(case, precisions_for(["float32"]), textbook("softmax", True))
    naive, shifted, stable = result.findings
    assert naive.grad_flags == ("nan",) and naive.grad_first_bad is not None
    assert (naive.grad_first_bad.stage, naive.grad_first_bad.kind) == ("log", "nan")
    # p = inf/inf = NaN in every class: g/p is NaN from the first (torch: all NaN)
    assert naive.grad_first_bad.index == (0, 0)
    assert shifted.grad_first_bad is not None and shifted.grad_first_bad.stage == "log"
    # softmax - onehot = [0, -1, 1] (e^-500 is 0 in float32): exact
    assert stable.grad_error == 0.0 and stable.grad_flags == ()
    doc = json.loads(render_json([result]))["scenarios"][0]["results"]
    assert doc[0]["grad_flags"] == ["nan"] and doc[0]["grad_first_bad_stage"] == "log"
    assert doc[2]["grad_error"] == 0.0


def test_zeroed_gradient_entries_are_flagged() -> None:
    # x = 20, z = 1: the true gradient sigmoid(20) - 1 = -2.06e-9 is a normal float32, but
    # float32 rounds sigmoid(20) to 1 and the gradient to 0.
    case = Case("z", np.array([20.0, -1.0]), np.array([1.0, 0.0]), "binary",
                LossSpec(family="sigmoid"))
    result = evaluate(case, precisions_for(["float32", "float64"]), textbook("sigmoid", True))
    stable32 = next(f for f in result.findings if f.pipeline == "stable" and f.dtype == "float32")
    stable64 = next(f for f in result.findings if f.pipeline == "stable" and f.dtype == "float64")
    assert "zeroed" in stable32.grad_flags and "zeroed" not in stable64.grad_flags


def test_probability_inputs_have_no_gradient_check() -> None:
    case = Case("p", np.array([[0.2, 0.8]]), np.array([1]), "index",
                LossSpec(from_logits=False))
    result = evaluate(case, precisions_for(["float32"]), textbook("softmax", False))
    assert all(f.grad_error is None and f.grad_flags == () for f in result.findings)


@pytest.mark.parametrize(("x", "t", "w"), [
    ([0.0, -40.0], 0, 1.0),  # the target is the maximum: -(1 - p_t) = -4.25e-18
    ([1.0, 2.0, 3.0], 1, 2.5),
    ([1000.0, 1000.5, 999.0], 2, 0.5),
])
def test_integer_label_reference_gradient_against_mpmath(x: list[float], t: int,
                                                         w: float) -> None:
    got = ref.softmax_index_gradients(np.array([x]), np.array([t]), np.array([w]))[0]
    row = [mpmath.mpf(v) for v in x]
    total = mpmath.fsum(mpmath.exp(v) for v in row)
    for j in range(len(x)):
        p = mpmath.exp(row[j]) / total
        true = w * (p - (1 if j == t else 0))
        assert abs(mpmath.mpf(got[j]) - true) <= 4 * np.spacing(abs(float(true)))


@pytest.mark.parametrize(("x", "target"), [
    ([1.5, -2.0, 7.25, 0.0], 2),  # target is the maximum: -(1 - p_t) without cancellation
    ([30.0, -30.0, 1e-9], 1),  # 1e-9 beside 30: the differences need TwoSum
    ([-8.0, -8.0, -7.5], 0),
])
def test_float32_reference_gradient_against_mpmath(x: list[float], target: int) -> None:
    logits = np.array([x], dtype=np.float32)
    got = ref.softmax_index_gradients(logits, np.array([target]), np.array([2.0]))[0]
    row = [mpmath.mpf(float(v)) for v in logits[0]]
    a = [2.0 if c == target else 0.0 for c in range(len(x))]
    for j in range(len(x)):
        def loss_j(t: mpmath.mpf, j: int = j) -> mpmath.mpf:
            return mp_loss([t if k == j else v for k, v in enumerate(row)], a)

        true = mpmath.diff(loss_j, row[j])
        assert abs(mpmath.mpf(got[j]) - true) <= 4 * np.spacing(abs(float(true))) + 1e-300


def _gradient_and_events(pipeline_name: str, family: str, dtype: str, case: Case,
                         fed: bool) -> tuple[np.ndarray, list[object]]:
    pipeline = next(p for p in textbook(family, True) if p.name == pipeline_name)
    den = Denominators(np.zeros(case.classes))
    for block in blocks(case):
        den.add(case, block)
    run = PipelineRun(pipeline, Precision(dtype))
    parts = []
    for block in blocks(case, block_elements=8):  # several blocks: saved values per block
        if fed:  # forward then backward from the forward's values, as the evaluator runs
            outcome = run.run_block(case, block, den)
            run.absorb(outcome)
            gradient = outcome.gradient
        else:  # backward alone, recomputing the forward values
            gradient = run.gradient(case, block, den)
        parts.append(np.asarray(gradient, dtype=np.float64))
    return np.concatenate(parts), run.gradient_runner.ordered_events()


_SOFTMAX_CASES = [
    Case("i", np.array([[1000.0, 2000.0, 2500.0], [1.0, 2.0, 3.0], [0.0, -90.0, 5.0]]),
         np.array([1, 2, 1]), "index", LossSpec()),
    Case("w", np.array([[3.0, -1.0, 0.5], [60.0, -60.0, 0.0], [2.0, 2.0, 2.0]]),
         np.array([0, 1, -100]), "index",
         LossSpec(class_weights=np.array([2.0, 0.5, 1.0]), ignore_index=-100)),
    Case("s", np.array([[3.0, -1.0, 0.5], [12.0, -20.0, 0.0]]), np.array([2, 1]), "index",
         LossSpec(label_smoothing=0.1)),
    Case("d", np.array([[3.0, -1.0, 0.5], [100.0, -20.0, 0.0]]),
         np.array([[0.2, 0.3, 0.5], [0.0, 1.0, 0.0]]), "probabilities", LossSpec()),
]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("name", ["naive", "shifted", "stable"])
@pytest.mark.parametrize("case", _SOFTMAX_CASES, ids=lambda c: c.name)
def test_backward_from_saved_forward_values_is_the_recomputed_backward(
        case: Case, name: str, dtype: str) -> None:
    # Reusing the forward pass's values must change nothing: same bits, same events.
    saved, saved_events = _gradient_and_events(name, "softmax", dtype, case, fed=True)
    fresh, fresh_events = _gradient_and_events(name, "softmax", dtype, case, fed=False)
    np.testing.assert_array_equal(saved, fresh)
    assert saved_events == fresh_events


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("name", ["naive", "stable"])
def test_sigmoid_backward_from_saved_forward_values(name: str, dtype: str) -> None:
    case = Case("b", np.array([[-20.0, 0.5, 90.0], [1.0, 30.0, -3.0]]),
                np.array([[1.0, 0.0, 0.0], [0.25, 1.0, 1.0]]), "binary",
                LossSpec(family="sigmoid"))
    saved, saved_events = _gradient_and_events(name, "sigmoid", dtype, case, fed=True)
    fresh, fresh_events = _gradient_and_events(name, "sigmoid", dtype, case, fed=False)
    np.testing.assert_array_equal(saved, fresh)
    assert saved_events == fresh_events


@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("name", ["naive", "shifted", "stable"])
def test_integer_labels_backward_equals_the_one_hot_backward(name: str, dtype: str) -> None:
    # Integer labels take a sparse path through the loss's backward; one-hot labels the
    # dense one. Autodiff gives both the same numbers.
    x = np.array([[3.0, -1.0, 0.5], [60.0, -60.0, 0.0], [2.0, 2.0, 7.0]])
    t = np.array([0, 1, 2])
    w = np.array([2.0, 0.5, 1.0])
    sparse = Case("i", x, t, "index", LossSpec(class_weights=w))
    dense = Case("o", x, np.eye(3)[t] * w[t][:, None], "probabilities", LossSpec(
        reduction="sum"))
    sparse_sum = Case("i", x, t, "index", LossSpec(class_weights=w, reduction="sum"))
    got, _ = _gradient_and_events(name, "softmax", dtype, sparse_sum, fed=True)
    want, _ = _gradient_and_events(name, "softmax", dtype, dense, fed=True)
    np.testing.assert_array_equal(got, want)
    assert _gradient_and_events(name, "softmax", dtype, sparse, fed=True)[0].shape == x.shape


# -- the gradient's flags agree with themselves -------------------------------------------------


def _sweep_cases() -> list[Case]:
    rng = np.random.default_rng(10)
    cases = []
    for classes in (1, 2, 3, 7, 40, 300):
        for scale in (0.5, 8.0, 60.0, 400.0, 3000.0):
            rows = 4
            x = rng.normal(0, scale, (rows, classes))
            t = rng.integers(0, classes, rows)
            cases.append(Case(f"i{classes}-{scale}", x, t, "index", LossSpec()))
            ignored = t.copy()
            ignored[::2] = -100
            cases.append(Case(f"g{classes}-{scale}", x, ignored, "index", LossSpec(
                ignore_index=-100, class_weights=rng.uniform(0.1, 3, classes),
                reduction="sum")))
            cases.append(Case(f"s{classes}-{scale}", x, t, "index", LossSpec(
                label_smoothing=0.1, reduction="none")))
            cases.append(Case(f"d{classes}-{scale}", x, rng.dirichlet(np.ones(classes), rows),
                              "probabilities", LossSpec()))
            z = rng.integers(0, 2, (rows, classes)).astype(float)
            cases.append(Case(f"b{classes}-{scale}", x, z, "binary", LossSpec(
                family="sigmoid", pos_weight=rng.uniform(0.5, 3, classes))))
        cases.append(Case(f"all-ignored{classes}", rng.normal(0, 3, (3, classes)),
                          np.full(3, -1), "index", LossSpec(ignore_index=-1)))
    return cases


@pytest.mark.parametrize("case", _sweep_cases(), ids=lambda c: c.name)
def test_gradient_flags_errors_and_stages_agree(case: Case) -> None:
    result = evaluate(case, precisions_for(["float16", "bfloat16", "float32", "float64"]),
                      textbook(case.spec.family, True))
    labels = np.asarray(case.labels)
    zero_reference = case.spec.family == "softmax" and (
        case.classes == 1 or bool(np.all(labels == case.spec.ignore_index)))
    for f in result.findings:
        assert f.grad_error is not None
        flags = set(f.grad_flags)
        where = (f.pipeline, f.dtype, f.grad_flags, f.grad_error)
        # every flag of a bad entry has its stage
        if flags & {"nan", "inf", "zeroed"}:
            assert f.grad_first_bad is not None, where
        # non-finite entries <=> non-finite error, of their kind
        assert ("nan" in flags) == bool(np.isnan(f.grad_error)), where
        assert ("inf" in flags and "nan" not in flags) == (f.grad_error == np.inf), where
        # a finite error beyond the tolerance <=> precision_loss
        if np.isfinite(f.grad_error):
            limit = f.tolerance.abs if zero_reference else f.tolerance.rel
            assert ("precision_loss" in flags) == (f.grad_error > limit), where
        else:
            assert "precision_loss" not in flags, where


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_one_class_gradient_error_is_absolute(dtype: str) -> None:
    # The true gradient of a one-class softmax is 0: the error is max |g|, not 0/0 or inf
    case = Case("c1", np.array([[3.0], [-2.5], [700.0]]), np.array([0, 0, 0]), "index",
                LossSpec())
    result = evaluate(case, precisions_for([dtype]), textbook("softmax", True))
    for f in result.findings:
        computed = pipeline_gradient(f.pipeline, "softmax", dtype, case)
        finite = computed[np.isfinite(computed)]
        if np.isnan(computed).any():
            assert np.isnan(f.grad_error) and "nan" in f.grad_flags
            continue
        largest = float(np.max(np.abs(finite))) if finite.size else 0.0
        assert f.grad_error == (np.inf if np.isinf(computed).any() else largest)
        assert ("precision_loss" in f.grad_flags) == (0.0 < largest < np.inf)
    stable = next(f for f in result.findings if f.pipeline == "stable")
    assert stable.grad_error == 0.0 and stable.grad_flags == ()


def test_zeroed_entries_are_traced_to_the_step_that_flushed_them() -> None:
    # sigmoid(20) - 1 = -2.06e-9 is a normal float32; the stable kernel's last step
    # (sigmoid * 1 - 1) rounds it to 0
    case = Case("z", np.array([20.0, -1.0]), np.array([1.0, 0.0]), "binary",
                LossSpec(family="sigmoid"))
    result = evaluate(case, precisions_for(["float32"]), textbook("sigmoid", True))
    stable = next(f for f in result.findings if f.pipeline == "stable")
    assert stable.grad_flags == ("zeroed",)  # normwise, -2e-9 against 0.13 is no loss
    assert stable.grad_first_bad is not None
    assert (stable.grad_first_bad.stage, stable.grad_first_bad.index) == ("combine", (0,))
    # softmax, float16: exp(-20) * g underflows in the exp step's backward at class 1
    case = Case("s", np.array([[0.0, -12.0, 3.0]]), np.array([2]), "index", LossSpec())
    result = evaluate(case, precisions_for(["float16"]), textbook("softmax", True))
    for f in result.findings:
        if "zeroed" in f.grad_flags and not {"nan", "inf"} & set(f.grad_flags):
            assert f.grad_first_bad is not None and f.grad_first_bad.index == (0, 1), f


def test_a_mean_over_no_counted_row_is_nan_and_its_gradient_exactly_zero() -> None:
    # torch: the mean of nothing is 0/0 = NaN; every row is ignored, so every gradient
    # entry is 0 (this raised ZeroDivisionError)
    case = Case("a", np.array([[1.0, 2.0], [3.0, -4.0]]), np.array([-100, -100]), "index",
                LossSpec(ignore_index=-100))
    result = evaluate(case, precisions_for(["float16", "float32"]), textbook("softmax", True))
    assert result.reference.loss is not None and np.isnan(result.reference.loss)
    for f in result.findings:
        assert f.grad_error == 0.0 and f.grad_flags == (), f


def test_a_gradient_zeroed_through_the_row_sum_is_traced_to_the_division() -> None:
    # [40, -40], target 1, naive float32: autograd of p = e / s forms (e_t / s) / s =
    # e^-120, which is 0 in float32, so s receives no gradient and class 0's entry is 0
    # (PyTorch's autograd of the same code gives [0, -1], against the true [1, -1]). The
    # zero reaches entry 0 through the row sum; the flush happened at class 1.
    case = Case("z", np.array([[40.0, -40.0]]), np.array([1]), "index", LossSpec())
    result = evaluate(case, precisions_for(["float32"]), textbook("softmax", True)[:1])
    [naive] = result.findings
    computed = pipeline_gradient("naive", "softmax", "float32", case)
    assert computed.tolist() == [[0.0, -1.0]]
    assert naive.grad_flags == ("zeroed", "precision_loss") and naive.grad_error == 1.0
    assert naive.grad_first_bad is not None
    assert (naive.grad_first_bad.stage, naive.grad_first_bad.kind,
            naive.grad_first_bad.index) == ("divide", "underflow", (0, 1))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("classes", [2, 3, 50])
def test_every_gradient_flag_has_its_stage_along_a_spread(dtype: str, classes: int) -> None:
    # rows [m, 0, ..., 0, -m], target the last, m from 1 to 800: every way the textbook
    # backward passes break on the way (flushes, overflow, NaN) must name its stage
    magnitudes = np.geomspace(1.0, 800.0, 60)
    x = np.zeros((len(magnitudes), classes))
    x[:, 0], x[:, -1] = magnitudes, -magnitudes
    for row in range(len(magnitudes)):
        case = Case("m", x[row:row + 1], np.array([classes - 1]), "index", LossSpec())
        result = evaluate(case, precisions_for([dtype]), textbook("softmax", True))
        for f in result.findings:
            if {"nan", "inf", "zeroed"} & set(f.grad_flags):
                assert f.grad_first_bad is not None, (f.pipeline, magnitudes[row], f.grad_flags)


def test_an_ignored_row_whose_gradient_is_nan_is_reported() -> None:
    # Row 0 is ignored, but autograd of the textbook forms still runs through it: p[0, 1] =
    # e^-205 is 0 in float32 and log's backward forms 0 / 0. PyTorch's gradient of
    # F.nll_loss(torch.log(p), t, ignore_index=-100) is [nan, nan, nan] there (the fixture's
    # "ignored_underflow" case), and it reaches the weights: an ignored row's loss counts
    # nowhere, its gradient does. F.cross_entropy (stable) gives exactly 0 in that row.
    case = Case("i", np.array([[0.0, -200.0, 5.0], [1.0, 2.0, 3.0]]), np.array([-100, 0]),
                "index", LossSpec(ignore_index=-100))
    result = evaluate(case, precisions_for(["float32"]), textbook("softmax", True))
    for f in result.findings:
        assert f.flags == (), f.pipeline
        if f.pipeline == "stable":
            assert f.grad_flags == () and f.grad_first_bad is None
            continue
        assert f.grad_flags == ("nan",) and np.isnan(f.grad_error or 0.0)
        assert f.grad_first_bad is not None
        assert (f.grad_first_bad.stage, f.grad_first_bad.index) == ("log", (0, 1))
