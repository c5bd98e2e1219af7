"""Host memory allocator settings for CPU training.

glibc's malloc serves large blocks (above a threshold that starts at 128 KiB and adapts up
to 32 MiB) with a fresh ``mmap`` and gives them back with ``munmap`` when freed. A training
step allocates and frees hundreds of MiB of activations, so with the default settings every
step page-faults (and the kernel zero-fills) that memory again; on a 2-core node this cost
25-40% of yolov5n's images/s (measured, bench/freeze.py). Keeping freed memory in the heap
for the next step removes it. The peak resident memory stays the same (a step needs that
much anyway); memory is only not handed back between steps.

PyTorch's CPU tuning guide suggests swapping in jemalloc or tcmalloc via ``LD_PRELOAD`` for
the same reason; that needs the library in the image and set before the process starts, and
jemalloc measured slower than tuned glibc here, so this uses glibc's own ``mallopt`` instead.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

# mallopt parameter numbers from glibc's <malloc.h>.
M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3

MMAP_THRESHOLD_BYTES = 1 << 30  # blocks up to 1 GiB come from the reusable heap
TRIM_THRESHOLD_BYTES = 1 << 30  # hand memory back only when 1 GiB at the top is unused
TOP_PAD_BYTES = 64 << 20  # grow the heap in 64 MiB steps, not one page-fault storm per step

# Set any of glibc's own variables to take control (they are read when the process starts);
# FINETUNE_MALLOC_TUNING=0 keeps glibc's defaults.
_GLIBC_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_")


def tune_malloc() -> bool:
    """Keep freed activation memory for reuse (glibc only); returns whether it was applied."""
    if os.environ.get("FINETUNE_MALLOC_TUNING", "1") == "0" or any(v in os.environ for v in _GLIBC_ENV):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt), or no libc at all
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return all(
        mallopt(param, value) == 1
        for param, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES),
            (M_TOP_PAD, TOP_PAD_BYTES),
        )
    )
