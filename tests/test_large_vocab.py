"""The large-vocabulary formulations ``accurate``, ``online`` and ``chunked`` against mpmath,
scipy's log1p ``logsumexp``, torch ops composed as each formulation composes them, and the
closed forms of their limits."""

from __future__ import annotations

import math
from pathlib import Path

import mpmath
import numpy as np
import pytest
from click.testing import CliRunner
from frameworks import recording_script, require
from hypothesis import given, settings
from hypothesis import strategies as st
from torch_fixture import bits, ulp_distance, xentcheck_result

from xentcheck.case import Case, LossSpec
from xentcheck.cli import cli
from xentcheck.evaluator import evaluate
from xentcheck.limits import limit_rows
from xentcheck.pipelines import select
from xentcheck.pipelines.large_vocab import liger_block_size
from xentcheck.precision import Precision, precisions_for

MPMATH_PREC = 200  # this module's tests run at it (conftest.py)
LARGE = ["accurate", "online", "chunked"]


def mp_losses(x: np.ndarray, target: np.ndarray) -> list[mpmath.mpf]:
    """``log(sum exp x) - x_t`` per row, in 200-bit arithmetic (masked -inf entries left out)."""
    out = []
    # its own precision, whoever calls it: 40 digits round log(e^48 + e^-43) - 48 = 3.0e-40
    # to 0
    with mpmath.workprec(200):
        for row, t in zip(np.asarray(x, dtype=np.float64), target, strict=True):
            kept = [mpmath.mpf(float(v)) for v in row if v != -np.inf]
            out.append(mpmath.log(mpmath.fsum(mpmath.exp(v) for v in kept))
                       - mpmath.mpf(float(row[t])))
    return out


def losses(name: str, x: np.ndarray, target: list[int], dtype: str,
           **spec: object) -> tuple[np.ndarray, np.ndarray]:
    case = Case("t", np.asarray(x, dtype=np.float64), np.asarray(target), "index",
                LossSpec(reduction="none", **spec))  # type: ignore[arg-type]
    return xentcheck_result(case, name, dtype)


# -- the numbers ---------------------------------------------------------------------


def test_accurate_keeps_the_tiny_losses_stable_rounds_to_zero() -> None:
    true = mpmath.log1p(mpmath.exp(-40))
    assert float(true) == 4.2483542552915889e-18
    assert losses("accurate", [[0.0, -40.0]], [0], "float64")[0][0] == 4.2483542552915889e-18
    assert losses("stable", [[0.0, -40.0]], [0], "float64")[0][0] == 0.0
    # float32 [0, -20]: log1p(e^-20) = 2.0611536e-9, one float32 rounding of each step away
    got = losses("accurate", [[0.0, -20.0]], [0], "float32")[0][0]
    assert ulp_distance(np.array([got]), np.array([float(mpmath.log1p(mpmath.exp(-20)))]),
                        "float32") <= 2
    assert f"{got:.3g}" == "2.06e-09"
    for other in ("stable", "online", "chunked"):
        assert losses(other, [[0.0, -20.0]], [0], "float32")[0][0] == 0.0, other


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_the_three_agree_with_mpmath_on_ordinary_rows(dtype: str) -> None:
    rng = np.random.default_rng(13)
    x = rng.normal(0, 3, (5, 3000))
    target = rng.integers(0, 3000, 5)
    true = mp_losses(x, target)
    eps = Precision(dtype).eps
    for name in LARGE:
        got = losses(name, x, list(target), dtype)[0]
        rel = max(abs(float((g - t) / t)) for g, t in zip(got, true, strict=True))
        # a loss of about 10 from terms summed over 3000 classes: a few roundings of D
        assert rel < 8 * eps, (name, rel)


# -- hypothesis: accurate is never worse than stable by more than a few ulps ---------------


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(-60, 60, allow_nan=False, width=32), min_size=2, max_size=12),
       st.integers(0, 11), st.sampled_from(["float32", "float64"]))
def test_accurate_is_never_worse_than_stable(values: list[float], pick: int, dtype: str) -> None:
    x = np.array([values])
    target = [pick % len(values)]
    true = mp_losses(x, np.array(target))[0]
    precision = Precision(dtype)

    def error(name: str) -> float:
        got = losses(name, x, target, dtype)[0][0]
        return float(abs(mpmath.mpf(float(got)) - true)) / float(precision.ulp(float(true)))

    assert error("accurate") <= error("stable") + 3


# -- scipy's logsumexp is the log1p form -----------------------------------------------------


def test_scipy_logsumexp_is_accurate_bit_for_bit() -> None:
    """scipy (1.15 on) separates the max's term and adds it back with log1p; for a row whose
    maximum is 0 and the target the maximum, ``accurate``'s loss is exactly that."""
    special = require("scipy.special")
    import inspect

    assert "log1p" in inspect.getsource(special._logsumexp._logsumexp)
    rng = np.random.default_rng(7)
    for dtype, width in (("float64", 300), ("float32", 50), ("float64", 5)):
        x = -np.abs(rng.normal(0, 12, (6, width)))
        target = rng.integers(0, width, 6)
        x[np.arange(6), target] = 0.0
        x[1, (target[1] + 1) % width] = -np.inf  # masked entries are exp(-inf) = 0 in both
        got = losses("accurate", x, list(target), dtype)[0]
        want = special.logsumexp(x.astype(dtype), axis=-1)
        assert np.array_equal(bits(got), bits(want.astype(np.float64))), dtype


# -- torch ops composed as the formulations compose them --------------------------------------


def _torch_accurate(torch: object, x: np.ndarray, target: list[int], dtype: str,
                    reduction: str) -> tuple[np.ndarray, np.ndarray]:
    """The torch code ``accurate`` stands for, and autograd of it."""
    record = recording_script("record_torch_textbook_gradients")
    t = torch.tensor(x, dtype=torch.float64).to(record.DTYPES[dtype])  # type: ignore[attr-defined]
    t.requires_grad_(True)
    m, k = t.max(-1, keepdim=True)
    z = t - m
    e = torch.exp(z).scatter(-1, k, 0.0)  # type: ignore[attr-defined]
    log_softmax = z - torch.log1p(e.sum(-1, keepdim=True))  # type: ignore[attr-defined]
    labels = torch.tensor(target)  # type: ignore[attr-defined]
    loss = -log_softmax.gather(-1, labels[:, None]).squeeze(-1)
    total = record.reduce(loss, reduction, float(len(target)), record.DTYPES[dtype])
    return total.detach().double().numpy(), t.grad.double().numpy()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_accurate_is_torch_autograd_of_its_ops(dtype: str, reduction: str) -> None:
    """Forward and backward against PyTorch's autograd of the same ops (CPU, one thread): bit
    for bit in float16 and bfloat16 (every step computed in float32 and rounded to D), within
    a few ulps in float32 and float64 (torch's exp and log1p are SLEEF's, not numpy's)."""
    torch = require("torch")
    torch.set_num_threads(1)
    rng = np.random.default_rng(5)
    x = np.round(rng.normal(0, 4, (6, 40)) * 8) / 8  # exact in every format
    x[0, :2] = [9.0, 9.0]  # ties: max's backward takes the first
    x[1, 3] = -np.inf
    target = [1, 0, 5, 39, 17, 2]
    case = Case("t", x, np.array(target), "index", LossSpec(reduction=reduction))  # type: ignore[arg-type]
    loss, grad = xentcheck_result(case, "accurate", dtype)
    want_loss, want_grad = _torch_accurate(torch, x, target, dtype, reduction)
    if dtype in ("float16", "bfloat16"):
        assert np.array_equal(bits(loss), bits(want_loss))
        assert np.array_equal(bits(grad), bits(want_grad))
    else:
        assert ulp_distance(loss, want_loss, dtype) <= 2
        scale = np.max(np.abs(want_grad))
        assert np.max(np.abs(grad - want_grad)) <= 8 * Precision(dtype).eps * scale


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("chunk_size", [4096, 1000, 7])
def test_chunked_is_cce_composed_of_torch_ops(dtype: str, chunk_size: int) -> None:
    """Cut Cross-Entropy's shape written with torch ops in float32 from D (a logsumexp per
    chunk, merged with log1p(exp(min - max)) + max, minus the target logit), stored in D:
    xentcheck's ``chunked`` losses, bit for bit."""
    torch = require("torch")
    torch.set_num_threads(1)
    rng = np.random.default_rng(11)
    x = rng.normal(0, 3, (8, 10000))
    x[:, 5] += 14  # a confident target: small losses, where the merge order shows
    target = [5, 5, 5, 9999, 4096, 5, 0, 5]
    case = Case("t", x, np.array(target), "index",
                LossSpec(reduction="none", chunk_size=chunk_size))
    loss, _ = xentcheck_result(case, "chunked", dtype)
    stored = {"float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    logits = torch.tensor(x).to(stored).float()
    lse = torch.full((len(target),), -math.inf)
    for chunk in logits.split(chunk_size, dim=-1):
        mx = chunk.amax(-1)
        part = mx + torch.log(torch.exp(chunk - mx[:, None]).sum(-1))
        high, low = torch.maximum(lse, part), torch.minimum(lse, part)
        lse = torch.log1p(torch.exp(low - high)) + high
    want = (lse - logits[torch.arange(len(target)), torch.tensor(target)]).to(stored)
    assert np.array_equal(bits(loss), bits(want.double().numpy()))


# -- online: Liger's blocks and its exp2 ------------------------------------------------------


def test_liger_block_size() -> None:
    assert [liger_block_size(c) for c in (1, 2, 3, 1000, 32000, 32768, 32769, 128256)] == [
        1, 2, 4, 1024, 32768, 32768, 32768, 32768]


def test_online_models_the_float32_rounding_of_tritons_exp2_argument() -> None:
    """``tl.exp(v)`` is ``exp2(v * log2 e)`` with the product rounded to float32: for
    ``[0, -30]`` the gradient of the second class is ``2^fl(-30 fl(log2 e))``, 17 float32
    ulps from ``e^-30`` (mpmath), where ``fused`` (a correctly rounded exp) is within one."""
    case = Case("t", np.array([[0.0, -30.0]]), np.array([0]), "index", LossSpec(reduction="sum"))
    log2e = np.float32(math.log2(math.e))
    t = np.float32(-30.0) * log2e  # the float32 product
    exact_power = mpmath.power(2, mpmath.mpf(float(t)))
    got = xentcheck_result(case, "online", "float32")[1][0, 1]
    assert got == float(np.float32(exact_power))
    true = mpmath.exp(-30)
    spacing = float(Precision("float32").ulp(float(true)))
    assert 16 < abs(float(mpmath.mpf(got) - true)) / spacing < 18
    fused = xentcheck_result(case, "fused", "float32")[1][0, 1]
    assert abs(float(mpmath.mpf(fused) - true)) / spacing <= 1


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_online_forms_the_target_gradient_in_float32_before_storing_it(dtype: str) -> None:
    """Liger (2026-08) folds ``-(1 - e)`` into the target's entry before it is stored in D:
    for ``[0, -8]``, label 0, that entry is ``p_0 - 1 = -e^-8 / (1 + e^-8)`` (mpmath)
    rounded to D once, where storing ``p_0`` first (rounding it to 1) would give 0. In
    bfloat16 that is the correctly rounded value; in float16 float32's own rounding of
    ``p_0`` (3e-8) is 0.13 of D's spacing there, and the true value lies 0.06 from a tie:
    within one unit."""
    case = Case("t", np.array([[0.0, -8.0]]), np.array([0]), "index", LossSpec(reduction="sum"))
    grad = xentcheck_result(case, "online", dtype)[1][0]
    true = -mpmath.exp(-8) / (1 + mpmath.exp(-8))
    want = np.asarray(Precision(dtype).round(np.array([float(true), float(-true)])), float)
    assert grad[0] != 0 and ulp_distance(grad, want, dtype) <= (0 if dtype == "bfloat16" else 1)


def test_online_blocks_rescale_the_running_sum() -> None:
    """Over 70,000 classes (three of Liger's blocks) with the max in the last block, the
    running sum is rescaled twice; the loss still matches mpmath to float32's rounding of
    ``lse`` (about 16: ``lse - x_t`` keeps its absolute error, 2^-20, whatever the loss)."""
    rng = np.random.default_rng(3)
    x = rng.normal(0, 2, (2, 70000))
    x[:, 69000] = 16.0
    target = [69000, 12]
    got = losses("online", x, target, "float32")[0]
    true = mp_losses(x, np.array(target))
    for g, t in zip(got, true, strict=True):
        assert abs(float(g - t)) <= 4 * 2.0**-20


# -- gradients: every label kind against the reference (checked against mpmath) --------------


@pytest.mark.parametrize("spec", [
    {}, {"label_smoothing": 0.1, "class_weights": np.linspace(0.5, 2.0, 300)},
    {"ignore_index": -100, "reduction": "sum"},
], ids=["plain", "smoothing_weights", "ignore"])
def test_gradients_and_losses_match_the_reference_in_float64(spec: dict[str, object]) -> None:
    rng = np.random.default_rng(17)
    x = rng.normal(0, 4, (4, 300))
    if "label_smoothing" not in spec:  # smoothing weighs every class: a mask makes it inf
        x[2, 7] = -np.inf
    labels = np.array([3, -100 if "ignore_index" in spec else 8, 299, 0])
    case = Case("t", x, labels, "index", LossSpec(**spec))  # type: ignore[arg-type]
    result = evaluate(case, precisions_for(["float64"]), select("softmax", True, LARGE))
    for f in result.findings:
        assert f.flags == () and f.grad_flags == (), f.pipeline
        assert f.rel_error is not None and f.rel_error < 1e-14, f.pipeline
        assert f.grad_error is not None and f.grad_error < 1e-13, f.pipeline


def test_dense_labels_gradient_matches_the_reference() -> None:
    rng = np.random.default_rng(19)
    x = rng.normal(0, 3, (3, 200))
    y = rng.dirichlet(np.ones(200), 3)
    case = Case("t", x, y, "dense", LossSpec(label_smoothing=0.05))
    result = evaluate(case, precisions_for(["float64", "float32"]),
                      select("softmax", True, LARGE))
    for f in result.findings:
        eps = Precision(f.dtype).eps
        assert f.rel_error is not None and f.rel_error < 16 * eps, (f.pipeline, f.dtype)
        assert f.grad_error is not None and f.grad_error < 64 * eps, (f.pipeline, f.dtype)


def test_finite_differences_of_the_float64_losses() -> None:
    """The gradient each pipeline reports is the derivative of the loss it computes: central
    differences of the float64 losses, step 1e-5."""
    rng = np.random.default_rng(23)
    x = rng.normal(0, 2, (1, 12))
    for name in LARGE:
        grad = losses(name, x, [4], "float64")[1][0]
        for j in (0, 4, 11):
            up, down = x.copy(), x.copy()
            up[0, j] += 1e-5
            down[0, j] -= 1e-5
            diff = (losses(name, up, [4], "float64")[0][0]
                    - losses(name, down, [4], "float64")[0][0]) / 2e-5
            assert abs(diff - grad[j]) < 1e-8, (name, j)


# -- masks ------------------------------------------------------------------------------------


def test_a_block_or_chunk_of_masked_logits_only_adds_nothing() -> None:
    """A chunk (chunked) or a Liger block (online) holding only -inf before any finite logit:
    the loss is the unmasked classes' (mpmath), its gradient 0 there."""
    x = np.full((1, 40000), -np.inf)
    x[0, 33000:] = np.random.default_rng(2).normal(0, 2, 7000)
    true = float(mp_losses(x, np.array([35000]))[0])
    for name in LARGE:
        loss, grad = losses(name, x, [35000], "float32", chunk_size=4096)
        assert abs(loss[0] - true) <= 4 * Precision("float32").ulp(true), name
        assert np.all(grad[0, :33000] == 0) and np.all(np.isfinite(grad)), name


def test_an_all_masked_row_is_nan() -> None:
    x = np.array([[-np.inf, -np.inf, -np.inf], [1.0, 2.0, 0.0]])
    case = Case("t", x, np.array([1, 0]), "index", LossSpec())
    result = evaluate(case, precisions_for(["float32"]), select("softmax", True, LARGE))
    for f in result.findings:
        assert f.loss is not None and math.isnan(f.loss) and f.flags == ("nan",), f.pipeline


# -- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize("classes", [1, 2, 3, 1000, 65520, 65521])
def test_limits_found_by_bisection_agree_with_the_closed_forms(classes: int) -> None:
    rows = limit_rows(select("softmax", True, LARGE), precisions_for(
        ["float16", "bfloat16", "float32", "float64"]), classes)
    assert all(row.agrees for row in rows), [(r.pipeline, r.dtype) for r in rows if not r.agrees]
    accurate16 = next(r for r in rows if (r.pipeline, r.dtype) == ("accurate", "float16"))
    # accurate sums C - 1 terms in D: the float16 sum of 65520 ones is inf, 65519 is not
    assert accurate16.bisected.no_safe_logit == (classes == 65521)
    online16 = next(r for r in rows if (r.pipeline, r.dtype) == ("online", "float16"))
    assert online16.bisected.largest_safe_logit == 65504.0  # float32 sums: the format's range


# -- chunk_size: scenario key and option ------------------------------------------------------


def _scenario(tmp_path: Path, extra: str) -> Path:
    path = tmp_path / "s.yaml"
    path.write_text("logits: [[0.0, 1.0, 2.0, 3.0, 4.0]]\nlabels: [1]\npipelines: chunked\n"
                    "dtypes: bfloat16\n" + extra, encoding="utf-8")
    return path


@pytest.mark.parametrize("value", ["0", "-3", "2.5", "true", "four"])
def test_a_bad_chunk_size_is_one_line_and_exit_2(tmp_path: Path, value: str) -> None:
    result = CliRunner().invoke(cli, ["run", str(_scenario(tmp_path, f"chunk_size: {value}\n"))])
    assert result.exit_code == 2
    assert "chunk_size" in result.output and "positive integer" in result.output
    assert "Traceback" not in result.output


def test_the_chunk_size_option_is_validated_and_sets_the_chunks(tmp_path: Path) -> None:
    import json

    from xentcheck.scenario import load_scenarios

    # in float32 a row's chunks of 2 (three partial sums merged) and of 5 (one sum) differ
    row = [0.4, -0.4, 1.9, 0.3, -1.6]
    path = tmp_path / "s.yaml"
    path.write_text(f"logits: [{row}]\nlabels: [1]\npipelines: chunked\ndtypes: float32\n"
                    "chunk_size: 2\nreduction: none\n", encoding="utf-8")
    [scenario] = load_scenarios(path)
    assert scenario.case.spec.chunk_size == 2
    # a scenario file gives chunk_size as a key, as it gives the loss options
    given = CliRunner().invoke(cli, ["run", "--chunk-size", "5", str(path)])
    assert given.exit_code == 2 and "--chunk-size applies to --logits" in given.output
    logits, labels = tmp_path / "x.npy", tmp_path / "y.npy"
    np.save(logits, np.array([row]))
    np.save(labels, np.array([1]))
    files = ["--logits", str(logits), "--labels", str(labels), "--reduction", "none",
             "--pipeline", "chunked", "--dtype", "float32"]
    bad = CliRunner().invoke(cli, ["run", *files, "--chunk-size", "0"])
    assert bad.exit_code == 2 and "Traceback" not in bad.output
    by_key = {}
    for option in (["--chunk-size", "2"], ["--chunk-size", "5"]):
        result = CliRunner().invoke(cli, ["run", *files, "--format", "json", *option])
        assert result.exit_code == 0, result.output
        [finding] = json.loads(result.output)["scenarios"][0]["results"]
        by_key[option[1]] = finding["per_example"][0]
    [from_scenario] = json.loads(CliRunner().invoke(
        cli, ["run", str(path), "--format", "json"]).output)["scenarios"][0]["results"]
    chunked = {}
    for size in (2, 5):
        case = Case("t", np.array([row]), np.array([1]), "index",
                    LossSpec(reduction="none", chunk_size=size))
        chunked[size] = float(xentcheck_result(case, "chunked", "float32")[0][0])
    assert chunked[2] != chunked[5]
    assert by_key["2"] == chunked[2] == from_scenario["per_example"][0]
    assert by_key["5"] == chunked[5]
