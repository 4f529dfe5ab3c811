"""Letting the C allocator keep freed memory for the next block instead of unmapping it.

A block's numpy temporaries are megabytes each. glibc's malloc serves requests that large
with fresh ``mmap`` pages and unmaps them on ``free``, so every temporary of every block
faults its pages in again: a third of a large run's time went to page faults. Raising the
mmap and trim thresholds keeps freed chunks in the heap for reuse. Peak memory does not grow:
it is still what the largest block's temporaries need at once.

This is process-wide, so the command line does it (:func:`keep_freed_memory` in ``cli``);
the library leaves a host program's allocator alone.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3

# Chunks up to 32 MiB (glibc's largest mmap threshold on 64-bit) come from the heap; up to
# 256 MiB of free heap top is kept rather than returned; the heap grows 16 MiB at a time.
_SETTINGS = ((_M_MMAP_THRESHOLD, 32 << 20), (_M_TRIM_THRESHOLD, 256 << 20),
             (_M_TOP_PAD, 16 << 20))


def keep_freed_memory() -> bool:
    """Tune glibc's malloc to reuse freed large chunks; True if it applied (Linux, glibc).

    Elsewhere (macOS, Windows, musl) nothing is changed and False is returned.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(mallopt(parameter, value) == 1 for parameter, value in _SETTINGS)
