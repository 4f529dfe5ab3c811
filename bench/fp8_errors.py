"""How far the 8-bit formats move a realistic loss: the numbers behind their default tolerance.

For rows of standard-normal logits times a scale, random integer labels, ``reduction:
none``, this runs ``stable`` (and ``naive``) through the evaluator in float8_e4m3fn,
float8_e5m2 and bfloat16 and prints, per format, in units of the format's eps:

* the arithmetic's relative error: the pipeline against the loss of the inputs rounded to
  the format (what ``precision_loss`` judges), median, 99th percentile and largest;
* the input rounding's: the loss of the rounded inputs against that of the inputs as given
  (what ``input_rounding`` judges);
* the share of rows the default tolerance (8 eps; 2 eps for the 8-bit formats) flags.

    python bench/fp8_errors.py
    python bench/fp8_errors.py --rows 1024 --seed 1

Deterministic for a seed: the formats' arithmetic does not depend on the machine.
"""

from __future__ import annotations

import argparse

import numpy as np

from xentcheck.case import Case, LossSpec
from xentcheck.evaluator import evaluate
from xentcheck.pipelines import select
from xentcheck.precision import Precision

SHAPES = [(10, 1.0), (10, 3.0), (256, 2.0), (1000, 3.0)]  # (classes, scale of the logits)
DTYPES = ["float8_e4m3fn", "float8_e5m2", "bfloat16"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{'C':>5} {'scale':>5} {'pipeline':8} {'dtype':14} {'arith/eps: q50':>14} "
          f"{'q99':>6} {'max':>6} {'input/eps: q50':>14} {'max':>6} "
          f"{'flagged arith':>13} {'flagged input':>13}")
    for classes, scale in SHAPES:
        logits = rng.normal(0.0, scale, (args.rows, classes))
        labels = rng.integers(0, classes, args.rows)
        case = Case("fp8", logits, labels, "index", LossSpec(reduction="none"))
        result = evaluate(case, [Precision(d) for d in DTYPES],
                          select("softmax", True, ["naive", "stable"]))
        truth = np.asarray(result.reference.per_example, dtype=np.float64).ravel()
        assert result.reference.rounded_counted is not None
        for finding in result.findings:
            eps = Precision(finding.dtype).eps
            rounded = result.reference.rounded_counted[finding.dtype]
            values = np.asarray(finding.per_example, dtype=np.float64).ravel()
            with np.errstate(invalid="ignore"):
                arith = np.abs(values - rounded) / np.abs(rounded) / eps
                moved = np.abs(rounded - truth) / np.abs(truth) / eps
            tol = finding.tolerance.rel / eps
            finite = np.isfinite(arith)
            quantiles = (np.quantile(arith[finite], [0.5, 0.99, 1.0]) if finite.any()
                         else [np.nan] * 3)
            print(f"{classes:>5} {scale:>5g} {finding.pipeline:8} {finding.dtype:14} "
                  f"{quantiles[0]:>14.2f} {quantiles[1]:>6.2f} {quantiles[2]:>6.2f} "
                  f"{np.median(moved):>14.2f} {moved.max():>6.2f} "
                  f"{np.mean(~(arith <= tol)):>13.1%} {np.mean(moved > tol):>13.1%}")


if __name__ == "__main__":
    main()
