"""Rows too wide for one block, with ``-inf`` masked entries: split and whole give the same.

As in ``test_wide_rows.py`` the summation chunk is shrunk to 64 values and blocks to 128,
so that rows of 600 classes split into several chunks. The input statistics of a split row
(extremes rounded per dtype, masked counts, spread over the logged classes, the lowest
logged logit) are compared with those of the same row whole; the wide-row reference with
the whole-row reference and with mpmath on the row less its masked entries (``exp(-inf)``
is an exact 0, so a masked entry adds nothing to the log-sum-exp); every registered
pipeline's evaluation, split or whole, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator

import mpmath
import numpy as np
import pytest

from xentcheck import chunking, execution
from xentcheck.case import Case, LossSpec, target_coefficients
from xentcheck.evaluator import evaluate, reference_block
from xentcheck.input_stats import block_stats as _block_stats
from xentcheck.pipelines import Block, available
from xentcheck.precision import Precision, precisions_for
from xentcheck.reference_split import split_row_reference
from xentcheck.report_json import render_json

MPMATH_DPS = 50  # this module's tests run at it (conftest.py)
CHUNK = 64
CLASSES = 600
SPLIT = 128
DTYPES = ("float16", "bfloat16", "float32", "float64")


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(chunking, "SUM_CHUNK", CHUNK)
    yield


def _cases() -> list[tuple[str, Case]]:
    rng = np.random.default_rng(17)
    x = rng.normal(0, 3, (5, CLASSES)).astype(np.float32)
    x[:, 200:260] = -np.inf  # a masked stretch across a chunk edge (256)
    x[:, 599] = -np.inf  # and the row's last class
    x[1, 300] = 20.0  # the maximum, in a later chunk
    x[2, 450] = -np.inf  # row 2's target is masked: loss inf
    x[3] = -np.inf  # every entry of row 3 is masked: loss NaN
    x[4, 5] = -60.0  # row 4's lowest logit, in the first chunk
    labels = np.array([450, 450, 450, 450, 7])
    ignored = labels.copy()
    ignored[3] = -100  # the all-masked row ignored: no loss, NaN in autograd's gradient
    soft = rng.dirichlet(np.ones(CLASSES), 5)
    soft[:, 200:260] = 0.0  # soft labels put no weight on the masked classes
    soft[:, 599] = 0.0
    soft[2, 450] = 0.0
    soft /= soft.sum(axis=-1, keepdims=True)
    weights = rng.uniform(0.5, 2.0, CLASSES)
    binary = (rng.uniform(size=(5, CLASSES)) > 0.5).astype(np.float64)
    binary[:, 200:260] = 0.0  # a masked entry of target 0 costs nothing; of target 1, inf
    binary[0, 210] = 1.0
    return [
        ("index", Case("t", x, labels, "index", LossSpec(reduction="none"))),
        ("index ignored weighted", Case("t", x, ignored, "index", LossSpec(
            ignore_index=-100, class_weights=weights))),
        ("index smoothing", Case("t", x, labels, "index", LossSpec(label_smoothing=0.1,
                                                                  reduction="sum"))),
        ("soft", Case("t", x, soft, "dense", LossSpec(class_weights=weights))),
        ("sigmoid", Case("t", x, binary, "binary", LossSpec(
            family="sigmoid", pos_weight=weights, class_weights=weights[::-1].copy()))),
        # loss options: -inf / T stays masked; a soft-cap maps it to -CAP (unmasked)
        ("index temperature zloss", Case("t", x, labels, "index", LossSpec(
            reduction="none", temperature=2.0, z_loss=1e-3))),
        ("index softcap", Case("t", x, labels, "index", LossSpec(logit_softcap=4.0))),
    ]


CASES = _cases()
IDS = [name for name, _ in CASES]


def _rows(case: Case, split: int | None) -> list[Block]:
    return [Block(case, case.logits_rows(r, r + 1), case.labels_rows(r, r + 1), r, split=split)
            for r in range(case.rows)]


@pytest.mark.parametrize(("name", "case"), CASES, ids=IDS)
def test_split_row_statistics_are_the_whole_rows(name: str, case: Case) -> None:
    for whole, split in zip(_rows(case, None), _rows(case, SPLIT), strict=True):
        expected = _block_stats(whole, DTYPES)
        found = _block_stats(split, DTYPES)
        # every field: extremes, spread, distributions, rounded extremes per dtype (largest,
        # smallest unmasked, spread over the logged classes, lowest logged logit), masked
        # entries and the rows they decide with their first positions
        assert found == expected, (name, whole.start)
    # the fixtures reach what they are meant to: masked entries counted, decided rows
    stats = [_block_stats(b, DTYPES) for b in _rows(case, SPLIT)]
    assert all(s.masked.entries > 0 for s in stats)
    if case.spec.family == "softmax":
        assert stats[3].masked.rows + stats[3].masked.ignored_rows == 1
        assert stats[3].largest == -np.inf and stats[3].smallest == np.inf


def test_the_lowest_logged_logit_and_spread_of_a_split_row() -> None:
    # closed forms: the row maximum less the target's logit; the lowest logged logit is the
    # target's (integer labels) or the row's smallest unmasked one (soft labels)
    (_, index), (_, _), (_, _), (_, soft) = CASES[:4]
    x = index.logits.astype(np.float64)
    [row4] = [b for b in _rows(index, SPLIT) if b.start == 4]
    stats = _block_stats(row4, DTYPES)
    assert stats.spread == np.max(x[4]) - x[4, 7]
    assert stats.rounded["float64"].smallest_logged == x[4, 7]
    assert stats.rounded["float16"].smallest_logged == float(np.float16(x[4, 7]))
    [soft4] = [b for b in _rows(soft, SPLIT) if b.start == 4]
    soft_stats = _block_stats(soft4, DTYPES)
    assert soft_stats.smallest == -60.0 and soft_stats.rounded["float32"].smallest_logged == -60.0
    assert soft_stats.spread == np.max(x[4]) + 60.0


@pytest.mark.parametrize(("name", "case"), CASES, ids=IDS)
def test_the_split_reference_is_the_whole_rows(name: str, case: Case) -> None:
    scale = 0.25
    for whole, split in zip(_rows(case, None), _rows(case, SPLIT), strict=True):
        losses, grad = reference_block(whole, gradient=True, gradient_scale=scale)
        split_losses, gradient_of = split_row_reference(split, scale)
        assert np.array_equal(split_losses, losses, equal_nan=True), (name, whole.start)
        pieces = [gradient_of(chunk) for chunk in split.column_chunks()]
        assert grad is not None and all(p is not None for p in pieces)
        assert np.array_equal(np.concatenate(pieces, axis=-1), grad, equal_nan=True)


def test_a_split_masked_row_against_mpmath() -> None:
    # exp(-inf) = 0: the loss of a row with masked entries is that of the row without them
    _, case = CASES[0]
    x = case.logits.astype(np.float64)
    for r, expected_kind in ((0, "finite"), (1, "finite"), (2, "inf"), (3, "nan")):
        [block] = [b for b in _rows(case, SPLIT) if b.start == r]
        loss = float(split_row_reference(block, 1.0)[0][0])
        if expected_kind == "inf":
            assert loss == np.inf  # the target is masked
            continue
        if expected_kind == "nan":
            assert np.isnan(loss)  # every entry masked: 0 / 0, as the frameworks give
            continue
        kept = [mpmath.mpf(v) for v in x[r] if v > -np.inf]
        lse = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in kept))
        expected = lse - mpmath.mpf(x[r, int(case.labels[r])])
        assert abs(mpmath.mpf(loss) - expected) <= 3 * 2.0**-53 * abs(expected)
    # the gradient of a masked entry is 0, of a counted row w_t (p - onehot(t))
    [block] = [b for b in _rows(case, SPLIT) if b.start == 1]
    _, gradient_of = split_row_reference(block, 1.0)
    grad = np.concatenate([gradient_of(c) for c in block.column_chunks()], axis=-1)[0]
    assert not grad[200:260].any() and grad[599] == 0
    weight = float(target_coefficients(case, case.labels[1:2])[0])
    p = np.exp(x[1] - x[1].max()) / np.exp(x[1] - x[1].max()).sum()
    p[450] -= 1.0
    np.testing.assert_allclose(grad, weight * p, rtol=1e-13, atol=1e-300)


@pytest.mark.parametrize(("name", "case"), CASES, ids=IDS)
def test_a_masked_evaluation_is_identical_split_or_whole(
        name: str, case: Case, monkeypatch: pytest.MonkeyPatch) -> None:
    pipelines = available(case.spec.family, case.spec.from_logits, every=True)
    # float8_e4m3fn stores a masked -inf as NaN (no infinity): the same NaN split or whole
    precisions = [*precisions_for([*DTYPES, "float8_e4m3fn", "float8_e5m2"]),
                  Precision("bfloat16", "same")]
    # whole rows one per block, as the split rows are: which row's event a report names
    # first may depend on how rows are grouped into blocks when one stage is watched by two
    # steps (sigmoid naive's two logs), split or not
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", CLASSES)
    whole = evaluate(case, precisions, pipelines)
    monkeypatch.setattr(execution, "BLOCK_ELEMENTS", SPLIT)
    split = evaluate(case, precisions, pipelines)
    assert render_json([split]) == render_json([whole])
    for a, b in zip(split.findings, whole.findings, strict=True):
        assert a.events == b.events and a.grad_first_bad == b.grad_first_bad
        assert (a.grad_row_errors is None and b.grad_row_errors is None) or np.array_equal(
            a.grad_row_errors, b.grad_row_errors, equal_nan=True)
