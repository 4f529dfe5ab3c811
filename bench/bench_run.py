"""Benchmark: xentcheck's diagnostic of one (pipeline, precision) pair against the baseline a
user would otherwise write, scipy.special.log_softmax plus the target gather, on the same
memory-mapped file in the same dtype; then the whole default matrix at two input sizes
(linear scaling) with its peak resident memory.

It also times the comparison as a user meets it, whole processes on the same file:
``xentcheck run`` of that one pair against a Python process that loads the file and runs the
scipy baseline (interpreter start-up and imports included on both sides).

Run it from the repository root (it needs scipy, the ``bench`` extra):

    pip install -e '.[bench]'
    python bench/bench_run.py                 # 1 GiB of float32 logits: a few minutes
    python bench/bench_run.py --rows 1024     # a quick look

Times are the best of --repeat runs (the machine is shared; the minimum is the least
disturbed). It first prints the machine it ran on (processor, cores, vector extensions,
numpy), since the ratios depend on it: numpy's float64 ``exp`` is vectorised only with
AVX-512. The generated files go to a temporary folder, removed at the end.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np


def machine() -> str:
    """The processor, its cores, its widest x86 vector extension, and the numpy that ran."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as info:
            for line in info:
                if line.startswith("model name") and model in ("", platform.machine()):
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    vector = next((name for name in ("avx512f", "avx2", "sse4_2") if name in flags), "unknown")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return (f"{model}, {cores} cores available, {vector.upper()}, "
            f"Python {platform.python_version()}, numpy {np.__version__}")


def best_of(repeat: int, action: Callable[[], object]) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        action()
        times.append(time.perf_counter() - start)
    return min(times)


def write_inputs(folder: Path, rows: int, vocab: int, dtype: str) -> tuple[Path, Path]:
    """Logits written in slices (never held in memory whole) and integer labels."""
    logits = folder / f"logits_{rows}x{vocab}_{dtype}.npy"
    labels = folder / f"labels_{rows}.npy"
    rng = np.random.default_rng(0)
    out = np.lib.format.open_memmap(logits, mode="w+", dtype=dtype, shape=(rows, vocab))
    step = max(1, (1 << 24) // vocab)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        out[start:stop] = rng.standard_normal((stop - start, vocab), dtype=np.float32) * 3
    out.flush()
    del out
    np.save(labels, rng.integers(0, vocab, rows))
    return logits, labels


def baseline(logits: Path, labels: Path) -> None:
    from scipy.special import log_softmax

    x = np.load(logits, mmap_mode="r")
    y = np.load(labels)
    log_p = log_softmax(np.asarray(x), axis=-1)
    float(-log_p[np.arange(len(y)), y].mean())


def baseline_with_gradient(logits: Path, labels: Path) -> None:
    """The baseline plus the gradient a user would check too: softmax - onehot, over N."""
    from scipy.special import log_softmax

    x = np.load(logits, mmap_mode="r")
    y = np.load(labels)
    log_p = log_softmax(np.asarray(x), axis=-1)
    rows = np.arange(len(y))
    float(-log_p[rows, y].mean())
    grad = np.exp(log_p, out=log_p)
    grad[rows, y] -= 1
    grad /= len(y)


def float64_exp(logits: Path, threads: int = 1) -> None:
    """The least a reference accurate to float64 must do: exp of every value in float64
    (block by block, on ``threads`` threads). Against the baseline it shows the floor of the
    ratio before any pipeline runs; one thread against two shows what a second core buys."""
    from concurrent.futures import ThreadPoolExecutor

    x = np.load(logits, mmap_mode="r")
    step = max(1, (1 << 20) // x.shape[1])
    starts = range(0, len(x), step)

    def exp_rows(start: int) -> None:
        np.exp(x[start:start + step], dtype=np.float64)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(exp_rows, starts))


_SCIPY_PROCESS = """
import sys
import numpy as np
from scipy.special import log_softmax
x = np.load(sys.argv[1], mmap_mode="r")
y = np.load(sys.argv[2])
log_p = log_softmax(np.asarray(x), axis=-1)
print(float(-log_p[np.arange(len(y)), y].mean()))
"""


def scipy_process(logits: Path, labels: Path) -> None:
    """The baseline as a process of its own: start-up, imports, load, compute."""
    subprocess.run([sys.executable, "-c", _SCIPY_PROCESS, str(logits), str(labels)],
                   check=True, stdout=subprocess.DEVNULL)


def xentcheck_process(logits: Path, labels: Path, dtype: str, pipeline: str) -> None:
    """``xentcheck run`` of one pair, as a user runs it."""
    subprocess.run(
        [sys.executable, "-m", "xentcheck", "run", "--logits", str(logits), "--labels",
         str(labels), "--dtype", dtype, "--pipeline", pipeline, "--format", "json",
         "--output", os.devnull],
        check=True, stdout=subprocess.DEVNULL,
    )


def diagnostic(logits: Path, labels: Path, dtype: str, pipeline: str) -> None:
    from xentcheck.arrays import load_array
    from xentcheck.case_validation import make_case
    from xentcheck.evaluator import evaluate
    from xentcheck.limits import pipeline_limit
    from xentcheck.pipelines import select
    from xentcheck.precision import Precision

    pipeline_limit.cache_clear()  # the limits' bisection is part of the cost
    case = make_case(
        name="bench",
        logits=load_array(logits, key=None, source="bench", field="logits"),
        labels=load_array(labels, key=None, source="bench", field="labels"),
    )
    evaluate(case, [Precision(dtype)], select("softmax", True, [pipeline]))


# The child reports its own peak, VmHWM of its address space: getrusage's ru_maxrss (self
# or children) keeps the high-water mark across exec, so it would count the pages a forked
# child shared with this large parent before it exec'd.
CHILD = """
import resource, runpy, sys
sys.argv = ["xentcheck", *sys.argv[1:]]
try:
    runpy.run_module("xentcheck", run_name="__main__")
finally:
    try:
        with open("/proc/self/status") as status:
            peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM"))
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(peak, file=sys.stderr)
"""


def full_matrix(logits: Path, labels: Path, *options: str) -> tuple[float, float]:
    """``xentcheck run`` with every precision and the default pipelines (or as ``options``
    say): (seconds, peak RSS in MiB)."""
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-c", CHILD, "run", "--logits", str(logits), "--labels",
         str(labels), "--format", "json", "--output", "/dev/null", *options],
        check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    seconds = time.perf_counter() - start
    peak_kib = int(done.stderr.strip().splitlines()[-1])  # KiB on Linux
    return seconds, peak_kib / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768)
    parser.add_argument("--dtype", default="float32", choices=["float16", "float32", "float64"])
    parser.add_argument("--pipeline", default="stable",
                        help="the pair timed as whole processes and against the baselines")
    parser.add_argument("--pairs", default=None,
                        help="pipelines timed pair by pair (default: every softmax pipeline "
                             "on logits), comma-separated")
    parser.add_argument("--pair-dtypes", default="float32,bfloat16",
                        help="the precisions the pairs are timed in, comma-separated")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--skip-matrix", action="store_true")
    parser.add_argument("--linearity", action="store_true",
                        help="also run the default matrix on half the rows")
    args = parser.parse_args()
    try:
        import scipy  # noqa: F401  (the baseline)
    except ImportError:
        sys.exit("bench_run.py compares against scipy, which is not installed: "
                 "pip install -e '.[bench]'")
    # as `xentcheck` does at start-up (both sides of the comparison run in this process)
    from xentcheck.allocator import keep_freed_memory

    keep_freed_memory()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        logits, labels = write_inputs(folder, args.rows, args.vocab, args.dtype)
        size = logits.stat().st_size / 2**30
        print(f"machine: {machine()}")
        print(f"input: {args.rows} x {args.vocab} {args.dtype} = {size:.3f} GiB")
        base_process = best_of(args.repeat, lambda: scipy_process(logits, labels))
        ours_process = best_of(args.repeat, lambda: xentcheck_process(
            logits, labels, args.dtype, args.pipeline))
        print(f"whole processes: scipy script {base_process:.3f} s, xentcheck run "
              f"{ours_process:.3f} s, ratio {ours_process / base_process:.2f}x")
        baseline(logits, labels)  # warm: scipy's import is not the baseline's cost
        base = best_of(args.repeat, lambda: baseline(logits, labels))
        ours = best_of(args.repeat, lambda: diagnostic(logits, labels, args.dtype,
                                                       args.pipeline))
        print(f"scipy log_softmax + gather:          {base:8.3f} s")
        print(f"xentcheck {args.pipeline} {args.dtype} (+ reference): {ours:8.3f} s")
        print(f"ratio: {ours / base:.2f}x  (goal: at most 1.5x)")
        with_grad = best_of(args.repeat, lambda: baseline_with_gradient(logits, labels))
        print(f"scipy, adding the gradient:          {with_grad:8.3f} s "
              f"(xentcheck against it: {ours / with_grad:.2f}x)")
        one = best_of(args.repeat, lambda: float64_exp(logits, threads=1))
        two = best_of(args.repeat, lambda: float64_exp(logits, threads=2))
        print(f"float64 exp of every value, one thread:  {one:8.3f} s = {one / base:.2f}x "
              "the baseline (the reference's floor)")
        print(f"the same on two threads:             {two:8.3f} s (speed-up {one / two:.2f})")
        from xentcheck.pipelines import available

        names = ([p.name for p in available("softmax", True)] if args.pairs is None
                 else [n for n in args.pairs.split(",") if n])
        for dtype in [d for d in args.pair_dtypes.split(",") if d]:
            for name in names:
                seconds = best_of(args.repeat, lambda n=name, d=dtype: diagnostic(
                    logits, labels, d, n))
                print(f"pair {name:8} {dtype:9} {seconds:8.3f} s = {seconds / base:5.2f}x "
                      "the baseline")
        if args.skip_matrix:
            return
        textbook, _ = full_matrix(logits, labels, "--pipeline", "naive,shifted,stable")
        seconds, peak = full_matrix(logits, labels)
        pipelines = len(available("softmax", True))
        print(f"textbook matrix (4 dtypes x 3 pipelines, the default before framework "
              f"pipelines): {textbook:.1f} s = {textbook / size:.1f} s per GiB")
        print(f"default matrix (4 dtypes x {pipelines} pipelines): {seconds:.1f} s = "
              f"{seconds / size:.1f} s per GiB")
        print(f"peak resident memory of the default matrix: {peak:.0f} MiB (goal: at most 400)")
        if args.linearity:
            half_logits, half_labels = write_inputs(folder, args.rows // 2, args.vocab,
                                                    args.dtype)
            half_seconds, _ = full_matrix(half_logits, half_labels)
            print(f"the default matrix on half the rows: {half_seconds:.1f} s (ratio "
                  f"{seconds / half_seconds:.2f}, linear is 2)")


if __name__ == "__main__":
    main()
