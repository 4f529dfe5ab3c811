"""Limits with the loss options, in terms of the raw logits: bisection on the pipeline with
options, the closed forms scaled by a temperature (and absent with a soft-cap or z-loss),
and the edges checked against what the pipeline computes just inside and just outside."""

from __future__ import annotations

import math

import numpy as np
import pytest

from xentcheck.case import Case, LossOptions, LossSpec
from xentcheck.execution import run_pipeline
from xentcheck.limit_closed_forms import closed_form_limit
from xentcheck.limits import (
    find_limit,
    limit_rows,
    pipeline_limit,
)
from xentcheck.pipelines import textbook
from xentcheck.precision import Precision, precisions_for

ALL = precisions_for(["float16", "bfloat16", "float32", "float64"])


def pipeline(family: str, name: str):  # type: ignore[no-untyped-def]
    return next(p for p in textbook(family, True) if p.name == name)


@pytest.mark.parametrize("temperature", [0.25, 3.0, 1e3])
@pytest.mark.parametrize("classes", [1, 3, 1000, 65521])
def test_temperature_closed_forms_agree_with_bisection(temperature: float,
                                                       classes: int) -> None:
    options = LossOptions(temperature=temperature)
    rows = limit_rows(textbook("softmax", True) + textbook("sigmoid", True), ALL, classes,
                      options)
    assert all(row.closed_form is not None for row in rows)
    assert all(row.agrees for row in rows), [(r.pipeline, r.dtype) for r in rows if not r.agrees]


def test_temperature_scales_the_naive_float32_edge() -> None:
    plain = pipeline_limit(pipeline("softmax", "naive"), Precision("float32"), 3)
    hot = pipeline_limit(pipeline("softmax", "naive"), Precision("float32"), 3, 0.0,
                         LossOptions(temperature=4.0))
    assert plain.largest_safe_logit is not None and hot.largest_safe_logit is not None
    # 88.72 - ln 3 = 87.62 before the temperature: four times that after it
    assert hot.largest_safe_logit == pytest.approx(4 * plain.largest_safe_logit, rel=2**-22)


def _loss(name: str, dtype: str, row: list[float], options: LossOptions) -> float:
    case = Case("edge", np.array([row]), np.array([0]), "index",
                LossSpec(reduction="none", **options.spec_fields("softmax")))  # type: ignore[arg-type]
    _, per_example, _ = run_pipeline(pipeline("softmax", name), Precision(dtype), case)
    return float(np.asarray(per_example, dtype=np.float64)[0])


@pytest.mark.parametrize("options", [LossOptions(logit_softcap=30.0),
                                     LossOptions(z_loss=1e-4),
                                     LossOptions(temperature=2.0, logit_softcap=5.0,
                                                 z_loss=1e-3)])
def test_softcap_and_zloss_edges_are_found_on_the_pipeline(options: LossOptions) -> None:
    precision = Precision("float16")
    for name in ("naive", "stable"):
        assert closed_form_limit(pipeline("softmax", name), precision, 3,
                                 options=options) is None
        found = find_limit(pipeline("softmax", name), precision, 3, options=options)
        edge = found.largest_safe_logit
        if edge is None:
            continue
        if edge < precision.max:  # the value of D above the edge is not safe, the edge is
            above = float(np.nextafter(np.float16(edge), np.float16(np.inf)))
            assert math.isfinite(_loss(name, "float16", [edge] * 3, options))
            assert not math.isfinite(_loss(name, "float16", [above] * 3, options))
        else:
            assert math.isfinite(_loss(name, "float16", [edge] * 3, options))


def test_a_cap_removes_the_overflow_edge_and_a_zloss_adds_one() -> None:
    precision = Precision("float16")
    naive = pipeline("softmax", "naive")
    plain = pipeline_limit(naive, precision, 3)
    capped = pipeline_limit(naive, precision, 3, 0.0, LossOptions(logit_softcap=5.0))
    # e^5 * 3 is far inside float16: the capped naive softmax never overflows
    assert plain.largest_safe_logit is not None and plain.largest_safe_logit < 11
    assert capped.largest_safe_logit == precision.max
    # the stable formulation has no edge, but lse^2 overflows float16 past 255.9 - ln 3
    stable = pipeline("softmax", "stable")
    assert pipeline_limit(stable, precision, 3).largest_safe_logit == precision.max
    z = pipeline_limit(stable, precision, 3, 0.0, LossOptions(z_loss=1e-4))
    assert z.largest_safe_logit is not None
    assert z.largest_safe_logit == pytest.approx(math.sqrt(65504) - math.log(3), abs=0.5)
