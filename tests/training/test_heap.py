"""The training process's heap thresholds (dvae/training/heap.py)."""

import ctypes
import platform
import subprocess
import sys

import pytest

# In a fresh process: a 1 MiB block is mapped on its own (glibc's first threshold is 128 KiB) and, once freed,
# raises the dynamic threshold to 1 MiB; a 16 MiB block would then be mapped too, unless the thresholds are fixed.
PROBE = """
import ctypes
from dvae.training.heap import keep_freed_memory_in_heap

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]

def mapped_blocks_while_holding(size):
    block = libc.malloc(size)
    mapped = libc.mallinfo2().hblks
    libc.free(block)
    return mapped

before = libc.mallinfo2().hblks
assert mapped_blocks_while_holding(2**20) == before + 1
print(keep_freed_memory_in_heap(), mapped_blocks_while_holding(16 * 2**20) - before)
"""


def has_mallinfo2() -> bool:
    return (sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
            and hasattr(ctypes.CDLL(None), "mallinfo2"))  # glibc 2.33 and later


@pytest.mark.skipif(not has_mallinfo2(), reason="glibc's mallopt and mallinfo2 (glibc 2.33 or later)")
def test_a_training_process_keeps_large_freed_blocks_in_its_heap():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["True", "0"]  # set, and the 16 MiB block came from the heap, not a mapping of its own
