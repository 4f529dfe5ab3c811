"""Rows too wide for one block run in column chunks, with every number of the whole row.

The summation chunk is shrunk to 64 values and blocks to 128 or 256, so that rows of 1,000
classes split into several chunks; each result is compared with the same input run whole
(identity, bit for bit), and the chunk-defined sums and the wide-row reference with
independent computations (math.fsum, mpmath at 50 digits, closed forms).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from itertools import pairwise
from pathlib import Path

import mpmath
import numpy as np
import pytest

from xentcheck import case_validation as scenario
from xentcheck import chunking, execution
from xentcheck.arrays import load_array
from xentcheck.case import Case, LossSpec
from xentcheck.chunking import chunk_sums, combine_chunk_sums, row_sum
from xentcheck.evaluator import evaluate
from xentcheck.execution import Denominators, PipelineRun, blocks
from xentcheck.findings import ScenarioResult
from xentcheck.gradients import GradientStats as _GradientStats
from xentcheck.pipelines import available
from xentcheck.precision import FloatArray, Precision, precisions_for
from xentcheck.report_json import render_json
from xentcheck.stages import StageRunner

MPMATH_DPS = 50  # this module's tests run at it (conftest.py)
CHUNK = 64
CLASSES = 600
# every dtype, and a running sum in D (sums of a split row carry it from chunk to chunk);
# in float8_e4m3fn the sums of 600 classes overflow to NaN (reported as overflows) and the
# framework pipelines are left out
EVERY_PRECISION = [*precisions_for(["float16", "bfloat16", "float32", "float64",
                                    "float8_e4m3fn", "float8_e5m2"]),
                   Precision("bfloat16", "same"), Precision("float8_e5m2", "same")]


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(chunking, "SUM_CHUNK", CHUNK)
    yield


# -- the chunk-defined sums ------------------------------------------------------------------


@pytest.mark.parametrize("width", [7, 64, 65, 200, 1000, 1024])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_row_sum_of_pieces_is_the_row_sum(width: int, dtype: type) -> None:
    rng = np.random.default_rng(width)
    x = rng.standard_normal((3, width)).astype(dtype)
    whole = row_sum(x)
    if width <= CHUNK:
        assert np.array_equal(whole, np.sum(x, axis=-1))  # nothing changes up to a chunk
    for cuts in ([], [CHUNK], [2 * CHUNK, 5 * CHUNK], list(range(CHUNK, width, CHUNK))):
        edges = [0, *[c for c in cuts if c < width], width]
        pieces = [chunk_sums(x[:, a:b]) for a, b in pairwise(edges)]
        assert np.array_equal(combine_chunk_sums(np.concatenate(pieces, axis=-1)), whole)
    # a pairwise sum of pairwise sums: within (log2 K + log2(C / K) + 2) u sum |x| of fsum
    u = float(np.finfo(dtype).eps) / 2
    depth = math.log2(CHUNK) + math.log2(max(1, width / CHUNK)) + 2
    for row, value in zip(x, whole, strict=True):
        exact = math.fsum(float(v) for v in row)
        assert abs(float(value) - exact) <= depth * u * float(np.abs(row).astype(float).sum())


def test_a_wide_row_is_cut_into_aligned_chunks_of_bounded_width() -> None:
    case = Case("t", np.zeros((2, CLASSES)), np.array([0, 1]), "index", LossSpec())
    for size, width in ((128, 128), (200, 192), (256, 256)):
        found = list(blocks(case, size))
        assert len(found) == 2 and all(b.split == width for b in found)
        columns = [c.columns for c in found[0].column_chunks()]
        assert columns[0] == (0, width) and columns[-1][1] == CLASSES
        for (_, stop), (start, _) in pairwise(columns):
            assert stop == start and start % CHUNK == 0
        assert all(stop - start <= width + 1 and stop - start >= 2 for start, stop in columns)
    # a last chunk of one class joins the one before: per-class arrays stay per-class
    single = Case("t", np.zeros((1, 257)), np.array([0]), "index", LossSpec())
    [block] = blocks(single, 128)
    assert [c.columns for c in block.column_chunks()] == [(0, 128), (128, 257)]


# -- identity with the whole row -------------------------------------------------------------


def _cases() -> list[tuple[str, Case]]:
    rng = np.random.default_rng(7)
    x = rng.normal(0, 2, (2, CLASSES)).astype(np.float32)
    x[1, 500] = 30.0  # float16's exp overflows here only, in a later chunk
    x[0, 450] = -25.0  # and the target's probability underflows here
    wide = rng.normal(0, 1, (2, CLASSES)) * np.exp2(rng.integers(-40, 10, (2, CLASSES)))
    labels = np.array([450, 500])
    weights = rng.uniform(0.5, 2.0, CLASSES)
    soft = rng.dirichlet(np.ones(CLASSES), 2)
    onehot = np.eye(CLASSES)[labels]
    probabilities = rng.dirichlet(np.ones(CLASSES) * 0.3, 2)
    binary = (rng.uniform(size=(2, CLASSES)) > 0.5).astype(np.float64)
    masked = binary.copy()
    masked[0, ::7] = -100
    return [
        ("index", Case("t", x, labels, "index", LossSpec())),
        ("index float64 wide range", Case("t", wide, labels, "index", LossSpec())),
        ("weights smoothing none", Case("t", x, labels, "index", LossSpec(
            class_weights=weights, label_smoothing=0.1, reduction="none"))),
        ("ignore_index", Case("t", x, np.array([-100, 500]), "index",
                              LossSpec(ignore_index=-100, class_weights=weights))),
        # torch's mean of label smoothing reduces per-row parts the per-example losses mix
        ("weights smoothing mean", Case("t", x, np.array([450, 31]), "index", LossSpec(
            class_weights=weights, label_smoothing=0.1))),
        ("one-hot", Case("t", x, onehot, "dense", LossSpec(reduction="sum"))),
        ("soft float64 wide range", Case("t", wide, soft, "dense", LossSpec())),
        ("soft weights", Case("t", x, soft, "dense", LossSpec(class_weights=weights))),
        ("probabilities", Case("t", probabilities, labels, "index",
                               LossSpec(from_logits=False))),
        ("probabilities soft", Case("t", probabilities, soft, "dense",
                                    LossSpec(from_logits=False, label_smoothing=0.2))),
        ("sigmoid", Case("t", x, binary, "binary", LossSpec(
            family="sigmoid", pos_weight=weights, class_weights=weights[::-1].copy()))),
        ("sigmoid ignore none", Case("t", x, masked, "binary", LossSpec(
            family="sigmoid", ignore_index=-100, reduction="none"))),
        ("sigmoid probabilities", Case("t", np.minimum(probabilities * 300, 0.999), binary,
                                       "binary", LossSpec(family="sigmoid", from_logits=False))),
        # the loss options: pre-steps per chunk, the z-term's logsumexp replayed
        ("options", Case("t", x * 10, labels, "index", LossSpec(
            temperature=0.7, logit_softcap=30.0, z_loss=1e-3))),
        ("options weights smoothing mean", Case("t", x, np.array([450, 31]), "index", LossSpec(
            class_weights=weights, label_smoothing=0.1, z_loss=1e-4, temperature=2.0))),
        ("options ignore none", Case("t", x, np.array([-100, 500]), "index", LossSpec(
            ignore_index=-100, reduction="none", logit_softcap=5.0, z_loss=0.5))),
        ("options soft", Case("t", x, soft, "dense", LossSpec(z_loss=1e-2, logit_softcap=8.0))),
        ("options sigmoid", Case("t", x, binary, "binary", LossSpec(
            family="sigmoid", temperature=3.0, logit_softcap=2.0))),
    ]


def _evaluate(case: Case, block_elements: int, monkeypatch: pytest.MonkeyPatch,
              precisions: list[Precision], *, splittable_only: bool = False) -> ScenarioResult:
    """Every registered pipeline (framework ones run a wide row whole: the same result)."""
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", block_elements)
    pipelines = available(case.spec.family, case.spec.from_logits, every=True)
    if splittable_only:
        pipelines = tuple(p for p in pipelines if p.splittable)
    return evaluate(case, precisions, pipelines)


CASES = _cases()


@pytest.mark.parametrize(("name", "case"), CASES, ids=[name for name, _ in CASES])
def test_an_evaluation_is_identical_split_or_whole(name: str, case: Case,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    whole = _evaluate(case, 1 << 20, monkeypatch, EVERY_PRECISION)
    for size in (128, 256):
        split = _evaluate(case, size, monkeypatch, EVERY_PRECISION)
        # every number of the report: losses, errors, flags, events and their indices,
        # gradient errors, the references as given and rounded
        assert render_json([split]) == render_json([whole])
        for a, b in zip(split.findings, whole.findings, strict=True):
            assert (a.grad_row_errors is None and b.grad_row_errors is None) or np.array_equal(
                a.grad_row_errors, b.grad_row_errors, equal_nan=True)
            assert a.events == b.events and a.grad_first_bad == b.grad_first_bad
            if a.per_example is not None:
                assert np.array_equal(a.per_example, b.per_example, equal_nan=True)


def test_events_in_a_later_chunk_keep_their_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    case = dict(CASES)["index"]
    split = _evaluate(case, 128, monkeypatch, [Precision("float16")])
    naive = next(f for f in split.findings if f.pipeline == "naive")
    # exp(x) overflows float16 (x > ln 65504 = 11.09) at exactly one place: row 1, class 500
    hot = np.argwhere(case.logits.astype(np.float64) > math.log(65504))
    assert hot.tolist() == [[1, 500]]
    assert ("exp", "overflow", (1, 500)) in [(e.stage, e.kind, e.index) for e in naive.events]
    # and exp / sum = inf / inf is NaN there, where the division makes it
    assert ("divide", "nan", (1, 500)) in [(e.stage, e.kind, e.index) for e in naive.events]
    # the target of row 0 (class 450, logit -25): exp(-25 - max) is below float16's range
    stable = next(f for f in split.findings if f.pipeline == "shifted")
    assert ("exp", "underflow", (0, 450)) in [(e.stage, e.kind, e.index) for e in stable.events]


@pytest.mark.parametrize(("name", "case"), CASES, ids=[name for name, _ in CASES])
def test_gradients_are_identical_split_or_whole(name: str, case: Case) -> None:
    for pipeline in available(case.spec.family, case.spec.from_logits, every=True):
        for precision in EVERY_PRECISION:
            results = []
            for size in (CLASSES, 128):  # one row per block either way
                run = PipelineRun(pipeline, precision)
                denominators = Denominators(np.zeros(case.classes))
                for block in blocks(case, size):
                    denominators.add(case, block)
                parts = [run.gradient(case, block, denominators) for block in blocks(case, size)]
                grad = None if parts[0] is None else np.concatenate(
                    [np.asarray(p, dtype=np.float64) for p in parts if p is not None])
                results.append((grad, run.gradient_runner.ordered_events()))
            (whole, whole_events), (split, split_events) = results
            assert split_events == whole_events
            assert (whole is None and split is None) or np.array_equal(split, whole,
                                                                       equal_nan=True)


def test_no_step_holds_more_than_a_chunk(monkeypatch: pytest.MonkeyPatch) -> None:
    widest = [0]
    elementwise = StageRunner._elementwise
    add = _GradientStats.add

    def spy_step(self: StageRunner, stage: str, fn: object, *operands: object,
                 **kw: object) -> FloatArray:
        widest[0] = max([widest[0], *(np.shape(o)[-1] for o in operands if np.ndim(o))])
        return elementwise(self, stage, fn, *operands, **kw)  # type: ignore[arg-type]

    def spy_gradient(self: _GradientStats, block: object, gradient: FloatArray,
                     reference: FloatArray, precision: Precision) -> None:
        widest[0] = max(widest[0], reference.shape[-1], np.shape(gradient)[-1])
        add(self, block, gradient, reference, precision)  # type: ignore[arg-type]

    monkeypatch.setattr(StageRunner, "_elementwise", spy_step)
    monkeypatch.setattr(_GradientStats, "add", spy_gradient)
    # the pipelines that keep the replay contract (the others run a wide row whole), torch
    # among them: its batch reductions of dense targets and of label smoothing recompute
    # per-row parts, in column chunks too
    smoothing = dict(CASES)["weights smoothing none"]
    cases = [dict(CASES)["soft weights"], dict(CASES)["sigmoid"],
             Case("t", smoothing.logits, smoothing.labels, "index",
                  LossSpec(class_weights=smoothing.spec.class_weights, label_smoothing=0.1))]
    for case in cases:
        result = _evaluate(case, 128, monkeypatch, [Precision("float32")],
                           splittable_only=True)
        assert "torch" in {f.pipeline for f in result.findings}
    assert 2 <= widest[0] <= 128 + 1


def test_a_sum_may_accumulate_as_a_library_does_whatever_the_precision_asks(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # 600 ones in bfloat16: a running sum in D stalls at 256 (256 + 1 rounds to 256); a
    # float32 sum is 600, which bfloat16 holds exactly. torch's log-softmax sums in float32
    # whatever --accumulate says, and so does its row sum replayed over column chunks.
    ones = np.ones((1, CLASSES), dtype=np.float32)
    runner = StageRunner(Precision("bfloat16", "same"), ["sum"])
    assert float(runner.sum("sum", ones)[0]) == 256.0
    assert float(runner.sum("sum", ones, accumulate="default")[0]) == 600.0
    assert float(runner.accumulate(ones, accumulate="default")[0]) == 600.0
    case = Case("t", np.zeros((1, CLASSES)), np.array([3]), "index", LossSpec(reduction="sum"))
    torch = next(p for p in available("softmax", True, every=True) if p.name == "torch")
    for size in (1 << 20, 128):
        result = _evaluate(case, size, monkeypatch, [Precision("bfloat16", "same")])
        [finding] = [f for f in result.findings if f.pipeline == torch.name]
        # log(600) rounded to bfloat16 (6.40625), where a sum stalled at 256 gives 5.53125
        assert finding.loss == float(Precision("bfloat16").round(np.log(np.float32(600.0))))
        assert finding.loss == 6.40625


# -- the reference of a wide row against mpmath ----------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_wide_row_reference_against_mpmath(dtype: type,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(11)
    x = (rng.normal(0, 3, (1, CLASSES)) * np.exp2(rng.integers(-30, 3, (1, CLASSES))))
    x = x.astype(dtype)
    x[0, 333] = 40.0  # the maximum, away from the first chunk
    soft = rng.dirichlet(np.ones(CLASSES), 1)
    cases = [Case("t", x, np.array([333]), "index", LossSpec(reduction="sum")),
             Case("t", x, np.array([512]), "index", LossSpec(reduction="sum")),
             Case("t", x, soft, "dense", LossSpec(reduction="sum"))]
    row = [mpmath.mpf(float(v)) for v in x[0]]
    lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in row))
    for case in cases:
        result = _evaluate(case, 128, monkeypatch, [Precision("float64")])
        if case.label_kind == "index":
            expected = lse - row[int(case.labels[0])]
        else:
            expected = mpmath.fsum(mpmath.mpf(float(a)) * (lse - v)
                                   for a, v in zip(soft[0], row, strict=True))
        assert result.reference.loss is not None
        # the reference's proven accuracy: a couple of ulp of float64
        assert abs(mpmath.mpf(result.reference.loss) - expected) <= 3 * 2.0**-53 * abs(expected)


def test_a_memory_mapped_wide_row_is_identical_split_or_whole(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # float32 logits rounded to float16 make the rounded references copies of the chunks,
    # whose pages are not the file's: only the file's own pages may be released
    case = dict(CASES)["index"]
    np.save(tmp_path / "logits.npy", case.logits)
    mapped = load_array(tmp_path / "logits.npy", key=None, source="test", field="logits")
    assert isinstance(mapped, np.memmap)
    on_file = Case("t", mapped, case.labels, "index", case.spec)
    precisions = precisions_for(["float16", "float32"])
    split = _evaluate(on_file, 128, monkeypatch, precisions)
    whole = _evaluate(case, 1 << 20, monkeypatch, precisions)
    assert render_json([split]) == render_json([whole])


def test_validation_scans_a_wide_row_in_pieces(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scenario, "_CHECK_VALUES", 128)
    seen: list[int] = []

    def screen(piece: FloatArray) -> bool:
        seen.append(piece.shape[-1])
        return True

    x = np.zeros((2, CLASSES))
    x[1, 477] = np.nan
    x[1, 590] = np.inf
    where = scenario._find_first(x, lambda v: ~np.isfinite(v), screen)
    assert where == [1, 477] and max(seen) == 128
    # a predicate over rows sees them whole: a first piece of zeros is not a row of zeros
    probabilities = np.zeros((2, CLASSES))
    probabilities[:, -1] = 1.0
    assert scenario._find_first(probabilities, lambda v: (v.sum(axis=-1) <= 0)[:, None],
                                whole_rows=True) is None
    probabilities[1, -1] = 0.0
    assert scenario._find_first(probabilities, lambda v: (v.sum(axis=-1) <= 0)[:, None],
                                whole_rows=True) == [1, 0]


def test_a_default_run_on_rows_too_wide_for_a_block_leaves_out_whole_row_pipelines(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # a default pipeline that could not replay over column chunks would be left out on rows
    # wider than a block (with a note), so that memory stays bounded; every default one
    # (torch included) replays, so the default set runs whole and nothing is left out
    from click.testing import CliRunner

    from xentcheck.cli import cli

    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", 256)
    assert all(p.splittable for p in available("softmax", True))
    np.save(tmp_path / "x.npy", np.linspace(-3, 3, 600).reshape(1, 600))
    np.save(tmp_path / "y.npy", np.array([7]))
    args = ["run", "--logits", str(tmp_path / "x.npy"), "--labels", str(tmp_path / "y.npy"),
            "--dtype", "float32", "--format", "json"]
    default = CliRunner().invoke(cli, args)
    assert default.exit_code == 0, default.output
    results = json.loads(default.stdout)["scenarios"][0]["results"]
    assert [r["pipeline"] for r in results] == ["naive", "shifted", "stable", "torch"]
    assert "left out" not in default.stderr
    # torch's loss on the wide row, run in column chunks, is the row's: -log softmax(x)[7]
    # (float32, a few ulp of the float64 value)
    x = np.linspace(-3, 3, 600)
    exact = float(np.log(np.sum(np.exp(x - x.max()))) - (x[7] - x.max()))
    torch_loss = next(r["loss"] for r in results if r["pipeline"] == "torch")
    assert abs(torch_loss - exact) <= 16 * 2.0**-24 * exact
    named = CliRunner().invoke(cli, [*args, "--pipeline", "stable,torch"])
    assert named.exit_code == 0 and "left out" not in named.stderr
    ran = [r["pipeline"] for r in json.loads(named.stdout)["scenarios"][0]["results"]]
    assert ran == ["stable", "torch"]
