"""Work units: the input rows one actor runs in one go (row ranges of one file, or of several small files packed together)."""

from __future__ import annotations

import math
from typing import Any

from rayinfer.io.ranges import Ranges, subtract_ranges
from rayinfer.io.scan import InputFile

UNIT_TARGET_ROWS = 1_000_000


UNIT_MAX_FILES = 2048  # the most files one unit (and so one part's footer) packs together


def make_units(
    files: list[InputFile], coverage: dict[str, Ranges] | None = None, unit_rows: int = UNIT_TARGET_ROWS,
    max_files: int = UNIT_MAX_FILES,
) -> list[dict[str, Any]]:
    """Cut files into work units of about ``unit_rows`` rows; drop the rows resume finds covered.

    A unit is a list of ``pieces``, each an input file and the row ranges of it to run
    (``ranges``, ascending), and its ``todo`` rows. Within a file, consecutive chunks are joined
    up to ``unit_rows``; a chunk larger than that is split into equal row ranges (each unit then
    decodes the whole chunk and keeps its slice: the price of feeding many actors from a small
    file). Pieces smaller than that, whole small files and the tails of large ones, are packed
    together in input order up to ``unit_rows`` (at most ``max_files`` files): a crawl of
    100,000 small shards makes units (and parts) of the size a large file would, not 100,000
    slivers. A part holds the rows of its unit's files in that order, and its footer names them
    per file, so resume and retry go on working row by row.
    """
    coverage = coverage or {}
    unit_rows = max(1, unit_rows)
    pieces: list[dict[str, Any]] = []

    def add(f: InputFile, start: int, stop: int) -> None:
        todo = subtract_ranges([(start, stop)], coverage.get(f.path, []))
        if todo:
            pieces.append({"file": f.path, "fingerprint": f.fingerprint, "ranges": [list(r) for r in todo],
                           "todo": sum(b - a for a, b in todo)})

    for f in files:
        run_start = offset = 0
        for n in f.chunk_rows:
            if offset > run_start and offset + n - run_start > unit_rows:
                add(f, run_start, offset)
                run_start = offset
            if n > unit_rows:  # one big chunk: equal slices of it
                count = -(-n // unit_rows)
                size = -(-n // count)
                for a in range(offset, offset + n, size):
                    add(f, a, min(a + size, offset + n))
                run_start = offset + n
            offset += n
        if offset > run_start:
            add(f, run_start, offset)
    return _packed(pieces, unit_rows, max_files)


def _packed(pieces: list[dict[str, Any]], unit_rows: int, max_files: int) -> list[dict[str, Any]]:
    """Consecutive pieces joined into units of at most ``unit_rows`` rows and ``max_files`` files
    (a piece of the file the unit ends with joins that piece)."""
    units: list[dict[str, Any]] = []
    for piece in pieces:
        unit = units[-1] if units else None
        if unit is None or unit["todo"] + piece["todo"] > unit_rows or (
                len(unit["pieces"]) >= max_files and unit["pieces"][-1]["file"] != piece["file"]):
            units.append({"pieces": [], "todo": 0})
            unit = units[-1]
        last = unit["pieces"][-1] if unit["pieces"] else None
        if last is not None and last["file"] == piece["file"]:
            last["ranges"] += piece["ranges"]
        else:
            unit["pieces"].append({k: piece[k] for k in ("file", "fingerprint", "ranges")})
        unit["todo"] += piece["todo"]
    return units


UNITS_PER_ACTOR = 4  # a job too small for this many part_rows units per actor gets smaller units
DECODE_UNIT_ROWS = 64  # the fewest rows a decoding task's unit gets: a decode step costs about the same for 8 rows as for 64


def unit_rows(todo: int, actors: int, part_rows: int, decodes: bool = False) -> int:
    """Rows per work unit: ``part_rows``, unless that would leave actors idle. Every actor should
    get several units (UNITS_PER_ACTOR), so that every actor works (120 rows on 4 actors make 15
    units of 8) and the last units end close together (3,000 prompts on 8 GPUs: 32 units of 94,
    not 12 of 256 with four GPUs doing two and four doing one). A decoding task's units are never
    cut below DECODE_UNIT_ROWS: 48 prompts on 2 actors made units of 6, decoded 6 rows a step."""
    rows = math.ceil(todo / (actors * UNITS_PER_ACTOR))
    if decodes:
        rows = max(rows, DECODE_UNIT_ROWS)
    return max(1, min(part_rows, rows))
