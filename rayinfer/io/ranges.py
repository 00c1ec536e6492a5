"""Row ranges: how rayinfer names sets of input rows (sorted, non-overlapping, half-open
[start, stop) pairs). Parts record their rows this way, units are made of them, and resume and
retry compute with them."""

from __future__ import annotations

import pyarrow as pa

Ranges = list[tuple[int, int]]
"""Sorted, non-overlapping half-open row ranges [start, stop)."""


def merge_ranges(ranges: list[tuple[int, int]]) -> Ranges:
    out: Ranges = []
    for start, stop in sorted(ranges):
        if start >= stop:
            continue
        if out and start <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], stop))
        else:
            out.append((start, stop))
    return out


def rows_to_ranges(rows: list[int]) -> Ranges:
    out: Ranges = []
    for r in sorted(rows):
        if out and r == out[-1][1]:
            out[-1] = (out[-1][0], r + 1)
        elif not out or r >= out[-1][1]:
            out.append((r, r + 1))
    return out


def covered_count(ranges: Ranges, start: int, stop: int) -> int:
    return sum(max(0, min(b, stop) - max(a, start)) for a, b in ranges)


def subtract_ranges(ranges: Ranges, minus: Ranges) -> Ranges:
    """The rows of ``ranges`` that are not in ``minus`` (both sorted, non-overlapping)."""
    out: Ranges = []
    minus = merge_ranges(list(minus))
    for a, b in ranges:
        for c, d in minus:
            if d <= a or c >= b:
                continue
            if c > a:
                out.append((a, c))
            a = max(a, d)
            if a >= b:
                break
        if a < b:
            out.append((a, b))
    return out


def clip_ranges(ranges: Ranges, start: int, stop: int) -> Ranges:
    """The parts of ``ranges`` inside [start, stop)."""
    return [(max(a, start), min(b, stop)) for a, b in ranges if b > start and a < stop]


def numbers(ranges: Ranges) -> pa.Array:
    import numpy as np

    return pa.array(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]), pa.int64())
