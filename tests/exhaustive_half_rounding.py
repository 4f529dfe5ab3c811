"""Check float16 rounding within float32 against numpy's conversion on all 2**32 inputs.

Not collected by pytest (about eight minutes on one core); run it by hand after touching
``xentcheck.precision._round_to_half``:

    python tests/exhaustive_half_rounding.py

The test suite keeps the cases that can go wrong (ties, neighbours of every float16 number,
the overflow edge, subnormals, NaN patterns that carry) and a million random ones.
"""

from __future__ import annotations

import sys

import numpy as np

from xentcheck.precision import Precision


def main() -> int:
    half = Precision("float16")
    step = 1 << 24
    for start in range(0, 1 << 32, step):
        x = np.arange(start, start + step, dtype=np.uint64).astype(np.uint32).view(np.float32)
        got = half.round(x)
        with np.errstate(over="ignore"):
            want = x.astype(np.float16).astype(np.float32)
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        if not same.all():
            bad = x[~same][:5]
            print(f"differs at bit patterns {[hex(v) for v in bad.view(np.uint32)]}")
            return 1
    print("float16 rounding within float32 equals numpy's conversion on all 2**32 inputs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
