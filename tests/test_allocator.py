"""The allocator tuning the command line applies before large runs."""

from __future__ import annotations

import platform
import sys

from xentcheck.allocator import keep_freed_memory


def test_mallopt_accepts_every_setting_on_glibc() -> None:
    # On glibc each mallopt call must succeed; elsewhere nothing is attempted.
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() is on_glibc
