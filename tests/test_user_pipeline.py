"""A user's loss function as a pipeline: the evaluator, the limits and the sweeps run it as
any formulation, measured against the reference and against the built-in pipeline that
computes the same formula."""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import mpmath
import numpy as np
import pytest

from xentcheck.case_validation import make_case
from xentcheck.errors import InputError
from xentcheck.evaluator import evaluate
from xentcheck.execution import run_with_gradient
from xentcheck.findings import Finding, ScenarioResult
from xentcheck.limits import find_limit
from xentcheck.pipelines import Pipeline, select
from xentcheck.precision import Precision
from xentcheck.sweep import SweepSpec, run_sweep
from xentcheck.user_functions.loading import load_function
from xentcheck.user_functions.pipeline import user_pipeline

Write = Callable[[str, str], Path]
EXAMPLES = Path(__file__).parent.parent / "examples"
FLOAT32 = Precision("float32")


def example(name: str, family: str = "softmax") -> Pipeline:
    return user_pipeline(load_function(f"{EXAMPLES / name}.py:loss"), family, True)


def written(write: Write, tmp_path: Path, name: str, source: str,
            family: str = "softmax", rank: int = 2) -> Pipeline:
    write(f"{name}.py", textwrap.dedent(source))
    return user_pipeline(load_function(f"{name}.py:loss", base=tmp_path), family, True, rank)


def finding(result: ScenarioResult, pipeline: str, dtype: str = "float32") -> Finding:
    (found,) = [f for f in result.findings if f.pipeline == pipeline and f.dtype == dtype]
    return found


def naive() -> Pipeline:
    (pipeline,) = select("softmax", True, ["naive"])
    return pipeline


def test_the_textbook_loss_is_nan_at_the_exp_line() -> None:
    pipeline = example("numpy_textbook")
    case = make_case(name="t", logits=np.array([[1000.0, 2000.0, 2500.0]]), labels=[0])
    result = evaluate(case, [FLOAT32], [naive(), pipeline])
    found = finding(result, pipeline.name)
    assert found.loss is not None and math.isnan(found.loss)
    assert {"nan", "overflow"} <= set(found.flags)
    assert (found.first_bad_stage, found.first_bad_index) == ("exp", [0, 0])
    exp_line = next(n for n, line in enumerate(
        (EXAMPLES / "numpy_textbook.py").read_text().splitlines(), 1) if "np.exp(" in line)
    # FILE as SPEC gives it (here an absolute path)
    assert found.first_bad_source == f"{EXAMPLES / 'numpy_textbook.py'}:{exp_line}"
    assert found.framework and result.frameworks  # set beside the frameworks' answers


def test_the_textbook_loss_is_naive_bit_for_bit() -> None:
    """Both compute exp / sum, log in D, op by op; on finite cases they agree exactly."""
    rng = np.random.default_rng(5)
    logits = rng.normal(0, 20, (64, 7))
    labels = rng.integers(0, 7, 64)
    case = make_case(name="r", logits=logits, labels=labels, reduction="none")
    precisions = [Precision("float32"), Precision("float64")]
    pipeline = example("numpy_textbook")
    result = evaluate(case, precisions, [naive(), pipeline])
    for dtype in ("float32", "float64"):
        mine, ours = finding(result, pipeline.name, dtype), finding(result, "naive", dtype)
        assert mine.per_example is not None and ours.per_example is not None
        assert np.array_equal(mine.per_example, ours.per_example)
        assert mine.rel_error == ours.rel_error


def test_a_sequence_batch_is_called_in_its_own_shape(write: Write, tmp_path: Path) -> None:
    """(batch, seq, vocab) reaches the function as it is; events are in its coordinates."""
    pipeline = written(write, tmp_path, "seq", """
        import numpy as np
        def loss(logits, labels):
            assert logits.ndim == 3 and labels.shape == logits.shape[:-1], logits.shape
            e = np.exp(logits)
            p = e / e.sum(axis=-1, keepdims=True)
            return -np.log(np.take_along_axis(p, labels[..., None], axis=-1)[..., 0])
    """, rank=3)
    logits = np.zeros((2, 3, 4))
    logits[1, 2, 1] = 500.0  # exp(500) overflows float32 there, and only there
    labels = np.array([[0, 1, 2], [3, 0, 1]])
    case = make_case(name="s", logits=logits, labels=labels, reduction="none")
    found = finding(evaluate(case, [FLOAT32], [pipeline]), pipeline.name)
    assert found.first_bad is not None
    assert (found.first_bad_stage, found.first_bad.kind, found.first_bad_index) == (
        "exp", "overflow", [1, 2, 1])
    assert found.first_bad_source == "seq.py:5"
    assert found.per_example is not None and found.per_example.shape == (2, 3)
    # every other example is -log(1/4)
    expected = np.full((2, 3), math.log(4.0))
    expected[1, 2] = np.nan
    assert np.allclose(found.per_example, expected, equal_nan=True, rtol=1e-7)
    # its limits (the headroom columns) call it with rows framed to its rank: (n, 1, 4)
    assert found.limit.largest_safe_logit is not None
    assert abs(found.limit.largest_safe_logit - (88.72 - math.log(4))) < 0.01


def test_a_scalar_answer_is_compared_with_the_reduced_reference(write: Write,
                                                                tmp_path: Path) -> None:
    pipeline = written(write, tmp_path, "meanloss", """
        import numpy as np
        def loss(logits, labels):
            z = logits - logits.max(axis=-1, keepdims=True)
            lse = np.log(np.exp(z).sum(axis=-1))
            picked = np.take_along_axis(z, labels[..., None], axis=-1)[..., 0]
            return np.mean(lse - picked)
    """)
    logits = np.array([[1.0, 2.0, 3.0], [4.0, 0.0, -1.0], [0.5, 0.5, 0.5]])
    labels = [0, 0, 2]
    mpmath.mp.dps = 40
    exact = sum(mpmath.log(sum(mpmath.exp(v) for v in row)) - row[y]
                for row, y in zip(logits.tolist(), labels, strict=True)) / 3
    for reduction in ("mean", "none"):
        case = make_case(name="m", logits=logits, labels=labels, reduction=reduction)
        found = finding(evaluate(case, [Precision("float64")], [pipeline]), pipeline.name,
                        "float64")
        if reduction == "mean":
            assert found.loss is not None and found.flags == ()
            assert abs(found.loss - float(exact)) <= 8 * np.finfo(np.float64).eps
        else:  # one call per example: the mean of one is that example's loss
            assert found.per_example is not None
            for row, y, got in zip(logits.tolist(), labels, found.per_example, strict=True):
                lse = mpmath.log(sum(mpmath.exp(v) for v in row))
                want = float(lse - row[y])
                # lse - picked cancels: the error is relative to the terms', not the result's
                assert abs(got - want) <= 8 * np.finfo(np.float64).eps * float(lse)


def test_a_sigmoid_loss_per_element(write: Write, tmp_path: Path) -> None:
    pipeline = written(write, tmp_path, "bce", """
        import numpy as np
        def loss(logits, targets):
            return np.maximum(logits, 0) - logits * targets + np.log1p(np.exp(-np.abs(logits)))
    """, family="sigmoid")
    logits = np.array([[3.0, -2.0], [0.0, 40.0]])
    targets = np.array([[1.0, 0.0], [0.5, 1.0]])
    case = make_case(name="b", logits=logits, labels=targets, family="sigmoid",
                     reduction="none")
    found = finding(evaluate(case, [Precision("float64")], [pipeline]), pipeline.name,
                    "float64")
    assert found.per_example is not None
    mpmath.mp.dps = 40
    for x, z, got in zip(logits.ravel(), targets.ravel(), found.per_example.ravel(),
                         strict=True):
        want = float(mpmath.log(1 + mpmath.exp(-abs(x))) + max(x, 0) - x * z)
        assert abs(got - want) <= 8 * np.finfo(np.float64).eps * abs(want)


def test_a_gradient_is_checked_against_the_reference(write: Write, tmp_path: Path) -> None:
    stable = example("numpy_stable")
    wrong = written(write, tmp_path, "wronggrad", """
        import numpy as np
        def loss(logits, labels):
            z = logits - logits.max(axis=-1, keepdims=True)
            log_softmax = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
            return -np.take_along_axis(log_softmax, labels[..., None], axis=-1)[..., 0]
        def gradient(logits, labels):
            e = np.exp(logits - logits.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)  # forgot the one-hot
        loss.gradient = gradient
    """)
    rng = np.random.default_rng(2)
    case = make_case(name="g", logits=rng.normal(0, 3, (16, 5)), labels=rng.integers(0, 5, 16))
    result = evaluate(case, [FLOAT32], [stable, wrong])
    good, bad = finding(result, stable.name), finding(result, wrong.name)
    assert good.grad_error is not None and good.grad_error < 4 * np.finfo(np.float32).eps
    assert good.grad_flags == ()
    assert bad.grad_error is not None and bad.grad_error > 0.1
    assert "precision_loss" in bad.grad_flags
    # the mean's gradient: each row's softmax - onehot over the 16 rows, as the evaluator's
    _, _, gradient = run_with_gradient(stable, FLOAT32, case)
    assert gradient is not None
    z = case.logits - case.logits.max(axis=-1, keepdims=True)
    exact = np.exp(z) / np.exp(z).sum(axis=-1, keepdims=True)
    exact[np.arange(16), case.labels] -= 1
    assert np.allclose(gradient, exact / 16, rtol=0, atol=1e-7)


def test_no_gradient_without_one() -> None:
    case = make_case(name="n", logits=np.array([[1.0, 2.0]]), labels=[0])
    found = finding(evaluate(case, [FLOAT32], [example("numpy_textbook")]),
                    str(EXAMPLES / "numpy_textbook.py") + ":loss")
    assert found.grad_error is None and found.grad_flags == ()


def test_limits_of_the_textbook_loss_are_naives() -> None:
    """Bisection on the function itself finds naive's edges bit for bit: largest safe
    logit ln(FLT_MAX) - ln 3 = 87.62 in float32 with three classes."""
    mine = find_limit(example("numpy_textbook"), FLOAT32, 3)
    ours = find_limit(naive(), FLOAT32, 3)
    assert mine == ours
    assert mine.largest_safe_logit is not None
    closed = math.log(float(np.finfo(np.float32).max)) - math.log(3)
    assert abs(mine.largest_safe_logit - closed) <= 2 * float(np.spacing(np.float32(closed)))
    assert f"{mine.largest_safe_logit:.2f}" == "87.62"
    # the next float32 up is not safe: the function itself overflows there
    above = np.nextafter(np.float32(mine.largest_safe_logit), np.float32(np.inf))
    case = make_case(name="edge", logits=np.full((1, 3), above, np.float32), labels=[0])
    loss = finding(evaluate(case, [FLOAT32], [example("numpy_textbook")]),
                   str(EXAMPLES / "numpy_textbook.py") + ":loss").loss
    assert loss is not None and not math.isfinite(loss)  # e / inf = 0: the loss is inf


def test_limits_of_a_scalar_function_one_row_per_call(write: Write, tmp_path: Path) -> None:
    pipeline = written(write, tmp_path, "meantextbook", """
        import numpy as np
        def loss(logits, labels):
            e = np.exp(logits)
            p = e / e.sum(axis=-1, keepdims=True)
            return -np.log(np.take_along_axis(p, labels[..., None], axis=-1)).mean()
    """)
    assert find_limit(pipeline, FLOAT32, 3) == find_limit(naive(), FLOAT32, 3)


def test_the_stable_loss_has_no_edge() -> None:
    limit = find_limit(example("numpy_stable"), FLOAT32, 3)
    assert limit.largest_safe_logit == float(np.finfo(np.float32).max)
    assert limit.largest_safe_spread == float(np.finfo(np.float32).max)


def test_a_sweep_of_the_textbook_loss_breaks_where_naive_does() -> None:
    spec = SweepSpec(classes=3, pattern="top", start=1.0, stop=1000.0, points=60)
    pipeline = example("numpy_textbook")
    result = run_sweep(spec, [FLOAT32], [naive(), pipeline])
    mine, ours = (next(c for c in result.curves if c.pipeline == name)
                  for name in (pipeline.name, "naive"))
    assert mine.first_nonfinite is not None
    assert mine.first_nonfinite == ours.first_nonfinite
    assert np.array_equal(mine.finite, ours.finite)
    # the first magnitude past ln(FLT_MAX) = 88.72 (top pattern: the largest logit is m)
    magnitudes = spec.magnitudes()
    assert mine.first_nonfinite == magnitudes[magnitudes > 88.72][0]


def test_a_function_that_raises_names_the_spec(write: Write, tmp_path: Path) -> None:
    pipeline = written(write, tmp_path, "oops", """
        def loss(logits, labels):
            return logits.no_such_method()
    """)
    case = make_case(name="o", logits=np.array([[1.0, 2.0]]), labels=[0])
    with pytest.raises(InputError) as raised:
        evaluate(case, [FLOAT32], [pipeline])
    assert str(raised.value) == ("oops.py:loss: raised AttributeError: 'Watched' object has no "
                                 "attribute 'no_such_method' (oops.py:3)")


def test_a_case_of_many_blocks_is_one_call(write: Write, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows are streamed in blocks for the built-in pipelines; a user function sees the
    whole case in one call (and the built-ins' answers do not change)."""
    import xentcheck.execution as execution

    pipeline = written(write, tmp_path, "counted", """
        import numpy as np
        SHAPES = []
        def loss(logits, labels):
            SHAPES.append(logits.shape)
            e = np.exp(logits)
            p = e / e.sum(axis=-1, keepdims=True)
            return -np.log(np.take_along_axis(p, labels[..., None], axis=-1)[..., 0])
    """)
    shapes = pipeline.function.function.__globals__["SHAPES"]  # type: ignore[attr-defined]
    rng = np.random.default_rng(3)
    case = make_case(name="many", logits=rng.normal(0, 4, (40, 4)),
                     labels=rng.integers(0, 4, 40), reduction="none")
    whole = evaluate(case, [FLOAT32], [naive()])
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", 16)  # 4 rows a block
    assert len(list(execution.blocks(case, execution.block_size(1)))) == 10
    result = evaluate(case, [FLOAT32], [naive(), pipeline])
    assert shapes[0] == (40, 4)
    mine, ours = finding(result, pipeline.name), finding(result, "naive")
    assert np.array_equal(mine.per_example, ours.per_example)
    assert np.array_equal(ours.per_example, finding(whole, "naive").per_example)


def test_loss_options_are_the_functions_own(write: Write, tmp_path: Path) -> None:
    """With temperature, a cap and a z-loss in the case, the function gets the logits as
    given: one that applies the options itself matches the reference, one that ignores them
    is off by the options' whole effect (xentcheck wraps only its own pipelines)."""
    source = """
        import numpy as np
        def loss(logits, labels):
            x = logits{options}
            m = x.max(axis=-1, keepdims=True)
            lse = (m + np.log(np.exp(x - m).sum(axis=-1, keepdims=True)))[..., 0]
            picked = np.take_along_axis(x, labels[..., None], axis=-1)[..., 0]
            return lse - picked{z}
    """
    applying = written(write, tmp_path, "withopts", source.format(
        options=" / 2.0\n            x = 5.0 * np.tanh(x / 5.0)", z=" + 1e-2 * lse ** 2"))
    ignoring = written(write, tmp_path, "without", source.format(options="", z=""))
    logits = np.array([[1.0, 12.0, -3.0], [0.25, 0.5, 9.0]])
    labels = np.array([1, 0])
    case = make_case(name="o", logits=logits, labels=labels, reduction="none",
                     temperature=2.0, logit_softcap=5.0, z_loss=1e-2)
    result = evaluate(case, [Precision("float64")], [applying, ignoring])
    mpmath.mp.dps = 40
    for row, y, got, off in zip(logits.tolist(), labels, *(
            finding(result, p.name, "float64").per_example for p in (applying, ignoring)),
            strict=True):
        x = [5 * mpmath.tanh(mpmath.mpf(v) / 2 / 5) for v in row]
        lse = mpmath.log(sum(mpmath.exp(v) for v in x))
        want = float(lse - x[y] + mpmath.mpf("1e-2") * lse ** 2)
        assert abs(got - want) <= 16 * np.finfo(np.float64).eps * abs(want)
        assert abs(off - want) > 0.01
