"""Benchmark at language-model scale: ``xentcheck run`` with the default pipelines and
precisions on a 4096 x 131072 bfloat16 ``.safetensors`` file of logits (1 GiB), as a
whole process, with its peak resident memory; and, in the same run, the float32 benchmark's
file (``bench_run.py``'s: 4096 x 32768 float32 ``.npy``, standard normal times 3) through the
same command, so that the ratio of the two times per value comes from one run on one
(shared, noisy) machine.

Run it from the repository root (it needs safetensors: ``pip install -e '.[safetensors]'``):

    python bench/bench_lm.py --repeat 2    # 1 GiB of bfloat16 logits: about 8 minutes
    python bench/bench_lm.py --rows 256    # a quick look (both files scaled down)

The logits look like a language model's: standard normal times 3, half the rows with a
confident target (20 above the rest), one row in fifty with a large logit (30 to 60). The
labels are int64, stored in the same file. The files go to a temporary folder, removed at
the end.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
from bench_run import best_of, full_matrix, machine, write_inputs

VOCAB = 131072
FLOAT32_VOCAB = 32768  # the float32 benchmark's width


def write_lm_logits(path: Path, rows: int, vocab: int, seed: int = 0) -> None:
    """A ``.safetensors`` file with bfloat16 ``logits`` (rows x vocab) and int64 ``labels``,
    written slice by slice through a memory map: the 1 GiB of logits is never in memory."""
    import json

    rng = np.random.default_rng(seed)
    labels = rng.integers(0, vocab, rows, dtype=np.int64)
    logits_bytes, labels_bytes = rows * vocab * 2, rows * 8
    header = json.dumps({
        "labels": {"dtype": "I64", "shape": [rows], "data_offsets": [0, labels_bytes]},
        "logits": {"dtype": "BF16", "shape": [rows, vocab],
                   "data_offsets": [labels_bytes, labels_bytes + logits_bytes]},
    }).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    with path.open("wb") as handle:
        handle.write(len(header).to_bytes(8, "little"))
        handle.write(header)
        handle.write(labels.tobytes())
        handle.truncate(8 + len(header) + labels_bytes + logits_bytes)
    out = np.memmap(path, dtype=ml_dtypes.bfloat16, mode="r+",
                    offset=8 + len(header) + labels_bytes, shape=(rows, vocab))
    step = max(1, (1 << 24) // vocab)
    for start in range(0, rows, step):
        stop = min(rows, start + step)
        block = rng.standard_normal((stop - start, vocab), dtype=np.float32) * 3
        local = np.arange(stop - start)
        confident = rng.random(stop - start) < 0.5
        block[local[confident], labels[start:stop][confident]] += 20
        large = local[rng.random(stop - start) < 0.02]
        block[large, rng.integers(0, vocab, len(large))] = rng.uniform(30, 60, len(large))
        out[start:stop] = block.astype(ml_dtypes.bfloat16)
    out.flush()
    del out


def reductions() -> str:
    """The row maxima of one block (2**20 values), per value: numpy's own reduction on
    bfloat16 (a value at a time) and on float32, and xentcheck's bfloat16 one (through
    float32, :mod:`xentcheck.extrema`)."""
    from xentcheck import extrema

    x = np.random.default_rng(0).standard_normal((8, VOCAB), dtype=np.float32) * 3
    b = x.astype(ml_dtypes.bfloat16)
    times = [best_of(5, lambda f=f, v=v: f(v, axis=-1)) / x.size * 1e9
             for f, v in ((np.max, b), (np.max, x), (extrema.maximum, b))]
    return (f"row maxima of 2**20 values, per value: numpy on bfloat16 {times[0]:.2f} ns, "
            f"on float32 {times[1]:.2f} ns; xentcheck.extrema on bfloat16 {times[2]:.2f} ns")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4096,
                        help="rows of both files (the README's numbers: 4096)")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs of each file, alternating; the best of each is kept")
    args = parser.parse_args()

    from xentcheck.allocator import keep_freed_memory

    keep_freed_memory()  # as the bench_run.py parent does
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        lm = folder / f"logits_{args.rows}x{args.vocab}_bfloat16.safetensors"
        write_lm_logits(lm, args.rows, args.vocab)
        f32_logits, f32_labels = write_inputs(folder, args.rows, FLOAT32_VOCAB, "float32")
        lm_values, f32_values = args.rows * args.vocab, args.rows * FLOAT32_VOCAB
        size = args.rows * args.vocab * 2 / 2**30
        print(f"machine: {machine()}")
        print(f"input: {args.rows} x {args.vocab} bfloat16 = {size:.3f} GiB (.safetensors); "
              f"float32 benchmark: {args.rows} x {FLOAT32_VOCAB} float32 = "
              f"{f32_values * 4 / 2**30:.3f} GiB (.npy)")
        print(f"load average (1 min) at the start: {os.getloadavg()[0]:.1f}")
        print(reductions())
        lm_runs, f32_runs = [], []
        for _ in range(args.repeat):  # alternating, so that both see the same load
            f32_runs.append(full_matrix(f32_logits, f32_labels))
            lm_runs.append(full_matrix(lm, lm, "--logits-key", "logits", "--labels-key",
                                       "labels"))
        # the fastest run is the least disturbed; the largest peak is the one to plan for
        lm_seconds, lm_peak = min(s for s, _ in lm_runs), max(p for _, p in lm_runs)
        f32_seconds, f32_peak = min(s for s, _ in f32_runs), max(p for _, p in f32_runs)
        lm_per, f32_per = lm_seconds / lm_values * 1e9, f32_seconds / f32_values * 1e9
        print(f"bfloat16 default matrix: {lm_seconds:.1f} s = {lm_seconds / size:.1f} s per GiB "
              f"= {lm_per:.0f} ns per value; peak resident memory {lm_peak:.0f} MiB")
        print(f"float32 default matrix:  {f32_seconds:.1f} s = {f32_per:.0f} ns per value; "
              f"peak resident memory {f32_peak:.0f} MiB")
        print(f"per-value time, bfloat16 / float32: {lm_per / f32_per:.2f} (goal: at most 1)")
        print(f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}")
        if args.repeat > 1:
            print("all runs (s): bfloat16 " + ", ".join(f"{s:.1f}" for s, _ in lm_runs)
                  + "; float32 " + ", ".join(f"{s:.1f}" for s, _ in f32_runs))


if __name__ == "__main__":
    main()
