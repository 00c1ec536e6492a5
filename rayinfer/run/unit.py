"""The one unit loop: read a unit's rows, run them, hand the output to its sink."""

from __future__ import annotations

import functools
import os
import resource
from typing import Any

import pyarrow as pa

PREFETCH_BATCHES = 2  # batches read and tokenized ahead of the model, per actor


def release_memory() -> None:
    """Hand freed heap back to the OS. Without it an actor's RSS crept up by ~100-300 bytes per
    row: glibc kept the pages that tokenizing, Arrow and torch had freed (a 50k-row unit of the
    tiny classifier left +40 MB of them for 3 MB of output), and later allocations landed
    elsewhere. With it, RSS stays flat (tests/test_corpus.py)."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's malloc_trim, loaded once; None where there is none (macOS, musl)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: the peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
