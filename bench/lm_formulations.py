"""Measure the large-vocabulary formulations in float16 and bfloat16 on LM-shaped rows.

For rows of 32,000, 128,256 and 256,000 classes (the vocabularies of Llama 2, Llama 3 and
Gemma) and three logit distributions, it runs ``stable``, ``accurate``, ``online`` and
``chunked`` through xentcheck's evaluator (``reduction: none``) and prints, per formulation
and dtype, the largest relative error of the per-example losses against xentcheck's
float64 reference, in units of the dtype's epsilon (2^-10 for float16, 2^-7 for bfloat16),
and the gradient's error (largest entry error over the largest true entry, same unit).

The distributions (each row: every logit drawn, then its target set):

``typical``
    logits N(0, 3), the target 8 above the row's largest (a trained model's confident
    prediction; the losses printed with each case);
``offset``
    the same rows moved up by 40 (an LM head without a centred output): the same losses;
``confident``
    logits N(0, 2), the target 25 above the largest: losses far below float16's range.

Run it from the repository root (a few minutes; it prints the machine it ran on):

    python bench/lm_formulations.py
    python bench/lm_formulations.py --rows 2 --classes 32000     # a quick look
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_run import machine

from xentcheck.case import Case, LossSpec
from xentcheck.evaluator import evaluate
from xentcheck.pipelines import select
from xentcheck.precision import FloatArray, Precision, precisions_for

PIPELINES = ["stable", "accurate", "online", "chunked"]
DTYPES = ["float16", "bfloat16"]
DISTRIBUTIONS = {
    "typical": (3.0, 8.0, 0.0),
    "offset": (3.0, 8.0, 40.0),
    "confident": (2.0, 25.0, 0.0),
}


def rows(classes: int, count: int, distribution: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` rows of logits of the distribution (values of bfloat16 and float16 alike
    would hide input rounding: the reference is of the inputs as given, and the errors
    below are measured against the loss of the inputs rounded to D)."""
    std, margin, offset = DISTRIBUTIONS[distribution]
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, std, (count, classes))
    target = rng.integers(0, classes, count)
    x[np.arange(count), target] = x.max(axis=-1) + margin
    return x + offset, target


def measure(classes: int, count: int,
            distribution: str) -> tuple[dict[tuple[str, str], tuple[float, float]], FloatArray]:
    """(pipeline, dtype) -> (loss error, gradient error), both in units of D's epsilon; and
    the reference's per-example losses (of the inputs as bfloat16 holds them).

    Each dtype runs on the inputs rounded to it (as float64 numbers), so that its reference,
    loss and gradient alike, is of the values D holds: the errors are the formulation's
    arithmetic, not the rounding of the inputs (which moves a 16-bit gradient by as much
    whatever the formulation)."""
    x, target = rows(classes, count, distribution, seed=classes)
    pipelines = select("softmax", True, PIPELINES)
    out = {}
    true = np.zeros(0)
    for dtype in DTYPES:
        held = np.asarray(Precision(dtype).round(x), dtype=np.float64)
        case = Case(distribution, held, target, "index", LossSpec(reduction="none"))
        result = evaluate(case, precisions_for([dtype]), pipelines)
        assert result.reference.per_example is not None  # reduction "none"
        truth = np.asarray(result.reference.per_example, dtype=np.float64).reshape(-1)
        eps = Precision(dtype).eps
        for f in result.findings:
            got = np.asarray(f.per_example, dtype=np.float64).reshape(-1)
            with np.errstate(divide="ignore", invalid="ignore"):
                rel = np.abs(got - truth) / np.abs(truth)
            grad = np.inf if f.grad_error is None else f.grad_error
            out[(f.pipeline, dtype)] = (float(np.max(rel)) / eps, grad / eps)
        true = truth
    return out, true


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=16, help="rows per case (default 16)")
    parser.add_argument("--classes", type=int, nargs="*", default=[32000, 128256, 256000])
    args = parser.parse_args()
    print(f"machine: {machine()}")
    print(f"{args.rows} rows per case; errors in units of the dtype's epsilon "
          "(float16 2^-10, bfloat16 2^-7): largest per-example loss error | gradient error")
    start = time.perf_counter()
    for distribution in DISTRIBUTIONS:
        for classes in args.classes:
            measured, true = measure(classes, args.rows, distribution)
            print(f"\n{distribution}, {classes} classes: losses {true.min():.2g} to "
                  f"{true.max():.2g}")
            print(f"  {'pipeline':9s}" + "".join(f"{d:>22s}" for d in DTYPES))
            for pipeline in PIPELINES:
                cells = "".join(f"{measured[(pipeline, d)][0]:11.3g} |"
                                f"{measured[(pipeline, d)][1]:8.3g}" for d in DTYPES)
                print(f"  {pipeline:9s}{cells}")
    print(f"\n{time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
