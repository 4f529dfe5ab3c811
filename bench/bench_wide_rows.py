"""Benchmark: ``xentcheck run`` on one very wide row (1 x 2,000,000 and 1 x 50,000,000 float32
classes by default): wall time and peak resident memory, optionally for another checkout too.

Each measurement is one child process running ``xentcheck run --logits ... --labels ...
--format json`` with every default precision and pipeline on a memory-mapped ``.npy``; the
child reports its own peak resident set (VmHWM). ``--no-limits`` replaces the limit
bisection (``pipeline_limit``, whose cost at millions of classes is a separate matter) by its
value for 1,024 classes, so that the evaluation itself is timed. ``--source DIR`` runs the
xentcheck package found in DIR instead of this one (e.g. an export of an older commit:
``git archive COMMIT xentcheck | tar -x -C /tmp/old``). A run past ``--timeout`` seconds is
stopped and reported as such.

    python bench/bench_wide_rows.py --no-limits
    python bench/bench_wide_rows.py --no-limits --source /tmp/old --classes 2000000

The input files go to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_run import CHILD

# The child is bench_run's (it reports its own peak), after an optional patch: with
# --no-limits, the limit bisection runs for at most 1,024 classes.
_NO_LIMITS = """
import sys
if sys.argv.pop(1) == "1":
    import xentcheck.evaluator as evaluator
    from xentcheck.limits import pipeline_limit

    def small_limit(pipeline, precision, classes, *args, **kwargs):
        return pipeline_limit(pipeline, precision, min(classes, 1024), *args, **kwargs)

    def no_prefetch(*args, **kwargs):
        return None

    evaluator.pipeline_limit = small_limit
    evaluator.prefetch_limits = no_prefetch
"""
_CHILD = _NO_LIMITS + CHILD


def write_row(folder: Path, classes: int) -> tuple[Path, Path]:
    """One row of ``classes`` float32 logits (written in slices) and its label."""
    logits = folder / f"logits_1x{classes}.npy"
    labels = folder / "labels_1.npy"
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(logits, mode="w+", dtype=np.float32, shape=(1, classes))
    step = 1 << 22
    for start in range(0, classes, step):
        stop = min(classes, start + step)
        out[0, start:stop] = rng.standard_normal(stop - start, dtype=np.float32) * 3
    out.flush()
    del out
    np.save(labels, rng.integers(0, classes, 1))
    return logits, labels


def measure(logits: Path, labels: Path, source: Path, no_limits: bool,
            timeout: float) -> tuple[float, float | None]:
    """(seconds, peak RSS in MiB); the peak is None when the run was stopped."""
    env = dict(os.environ, PYTHONPATH=str(source))
    start = time.perf_counter()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, "1" if no_limits else "0", "run", "--logits",
             str(logits), "--labels", str(labels), "--format", "json", "--output", "/dev/null"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            timeout=timeout, cwd=source,
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, None
    except subprocess.CalledProcessError as failed:
        sys.exit(f"xentcheck run failed:\n{failed.stderr}")
    seconds = time.perf_counter() - start
    return seconds, int(done.stderr.strip().splitlines()[-1]) / 1024  # KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, nargs="+", default=[2_000_000, 50_000_000])
    parser.add_argument("--source", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--no-limits", action="store_true")
    parser.add_argument("--timeout", type=float, default=600.0)
    args = parser.parse_args()
    print(f"xentcheck from {args.source}; limits {'excluded' if args.no_limits else 'included'}")
    with tempfile.TemporaryDirectory() as tmp:
        for classes in args.classes:
            logits, labels = write_row(Path(tmp), classes)
            seconds, peak = measure(logits, labels, args.source.resolve(), args.no_limits,
                                    args.timeout)
            size = logits.stat().st_size / 2**20
            shown = f"{peak:8.0f} MiB" if peak is not None else "  stopped"
            print(f"1 x {classes:>11,} float32 ({size:7.1f} MiB): {seconds:8.1f} s  peak {shown}")
            logits.unlink()


if __name__ == "__main__":
    main()
