"""Fixed thresholds for the C heap of a training process (glibc only; elsewhere nothing changes).

glibc hands a freed block above its mmap threshold straight back to the kernel, and it raises that threshold
only to the largest block the process has freed so far. Where nothing large was ever freed (data=shapes), every
update's larger activations are mapped afresh and the kernel zeroes their pages again, which made data=shapes
runs much slower than the photographs (docs/benchmarks.md). Fixed thresholds keep freed memory for the next update.
"""

from __future__ import annotations

import ctypes
import platform
import sys

# mallopt(3) parameters
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
# blocks up to 32 MiB (the largest mmap threshold glibc accepts on 64-bit) come from the heap, and up to 64 MiB
# of free memory at its top is kept rather than returned
MMAP_THRESHOLD = 32 * 2**20
TRIM_THRESHOLD = 64 * 2**20


def keep_freed_memory_in_heap() -> bool:
    """Fix glibc's mmap and trim thresholds for the rest of the process (they cannot be made dynamic again).
    Returns whether both were set: False off Linux, on another C library, or if glibc refuses a value."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
