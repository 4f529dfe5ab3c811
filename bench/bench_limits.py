"""Benchmark: the cost of the limits for many classes, where each evaluation of the
pipeline is a whole row of C logits (issue 10, item 12).

Times ``xentcheck run`` on one row of 2,000,000 float32 logits (every pipeline, every
dtype: the limits of 12 pairs) and ``xentcheck limits --classes 128256``, each as a
separate process, best of --repeat, and counts the rows of C logits the limits evaluated.

    python bench/bench_limits.py
    python bench/bench_limits.py --classes 500000 --repeat 1

The input goes to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

COUNT_ROWS = """
import sys
import xentcheck.limits as limits
from xentcheck.pipelines import available
from xentcheck.precision import precisions_for
rows = 0
evaluate = limits._finite_rows
def counted(*args, **kwargs):
    global rows
    rows += len(args[2])
    return evaluate(*args, **kwargs)
limits._finite_rows = counted
classes = int(sys.argv[1])
for precision in precisions_for(["float16", "bfloat16", "float32", "float64"]):
    for pipeline in available("softmax", True):
        limits.pipeline_limit(pipeline, precision, classes)
print(rows)
"""


def best_of(repeat: int, command: list[str]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=2_000_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        logits, labels = Path(folder) / "x.npy", Path(folder) / "y.npy"
        rng = np.random.default_rng(0)
        np.save(logits, rng.standard_normal((1, args.classes)).astype(np.float32))
        np.save(labels, np.array([3]))
        xentcheck = [sys.executable, "-m", "xentcheck"]
        run = best_of(args.repeat, [*xentcheck, "run", "--logits", str(logits),
                                    "--labels", str(labels)])
        print(f"run, 1 x {args.classes:,} float32, every pipeline and dtype: {run:.2f} s")
        table = best_of(args.repeat, [*xentcheck, "limits", "--classes", "128256"])
        print(f"limits --classes 128256: {table:.2f} s")
        rows = subprocess.run([sys.executable, "-c", COUNT_ROWS, str(args.classes)],
                              check=True, capture_output=True, text=True).stdout.strip()
        print(f"rows of {args.classes:,} logits the softmax limits evaluate: {rows}")


if __name__ == "__main__":
    main()
