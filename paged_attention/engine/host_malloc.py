"""Keep the C heap from handing large freed blocks back to the kernel while
the engine runs, and hand back what loading left behind once.

A prompt chunk's activations are tens of megabytes each (8,192 tokens x
3,072 bfloat16 gate/up values = 48 MiB). glibc's malloc serves blocks above
its mmap threshold (at most 32 MiB by default) with a fresh `mmap` and
returns them with `munmap` when freed, and trims the heap's free top
likewise: every such tensor, every layer, every step, starts as untouched
pages, and the kernel faults and zeroes each 4 KiB page on first write. An
8,192-token prefill step took 2.7 s that way and 2.1 s with the thresholds
below (SmolLM2-135M, bfloat16, two threads), which keep freed blocks in the
heap for the next layer to reuse. The cost: the process keeps its peak
activation memory (a few hundred MiB at the largest chunks) instead of
returning it between steps.

Loading the model frees many temporaries (GGUF blocks, repacking) between
blocks that stay, and glibc keeps such holes: `release_free_memory` returns
them once the engine is built (390 -> 359 MiB at start for the default model).

Process-wide, like the thread count; glibc only (elsewhere nothing changes).
"""

from __future__ import annotations

import ctypes
import functools
import logging

logger = logging.getLogger(__name__)

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 256 << 20  # blocks this large still get their own mapping (the KV pool, weights)
TRIM_THRESHOLD = 1 << 30


@functools.cache
def keep_freed_memory() -> bool:
    """Raise glibc's mmap and trim thresholds, once per process; whether it took."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done = all(
        mallopt(param, value)
        for param, value in ((_M_MMAP_THRESHOLD, MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    )
    if not done:
        logger.debug("mallopt refused the heap thresholds; large tensors stay mmapped")
    return done


def release_free_memory() -> bool:
    """Return the heap's free pages to the kernel (`malloc_trim(0)`, which also
    releases whole free pages between blocks in use); whether any went back."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
