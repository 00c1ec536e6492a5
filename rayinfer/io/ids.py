"""Duplicate ids in an input, found in one streaming pass over its id column before Ray starts.

Users join outputs back to their data by id: an id on two rows multiplies rows in that join, and a
resume or retry report about "id 2" is ambiguous. The pass reads the id column alone through the
one reader (``read_rows``), in every format: Parquet and Arrow read that column only; JSON Lines
and CSV are parsed (projected to the id), which costs about what indexing them when the job is
planned already costs (measured: README, "Every id once"). It keeps 8 bytes a row (an integer id, else
a hash of it) and sorts them once; a second pass, only when the first found repeats, confirms
them on the real values and finds where they are, so a hash collision never refuses a job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
import pyarrow as pa

from rayinfer.io.rows import read_rows
from rayinfer.io.scan import InputFile

_READ_ROWS = 65_536
_EXAMPLES = 2


@dataclass
class DuplicateIds:
    """What the pass found: ``rows`` rows whose id an earlier row already has, over ``ids``
    distinct ids, and up to two examples: (id, [(file, row), ...])."""

    rows: int
    ids: int
    examples: list[tuple[Any, list[tuple[str, int]]]] = field(default_factory=list)

    def describe(self, id_column: str) -> str:
        shown = "; ".join(f"id {value!r} at {_places(where)}" for value, where in self.examples)
        return (f"{self.rows} row(s) repeat an id of another row ({self.ids} distinct id(s) in column "
                f"{id_column!r} appear more than once), e.g. {shown}")


def _places(where: list[tuple[str, int]]) -> str:
    by_file: dict[str, list[int]] = {}
    for path, row in where:
        by_file.setdefault(os.path.basename(path.rstrip("/")) or path, []).append(row)
    return ", ".join(f"{name} row{'s' if len(rows) > 1 else ''} {_listed(rows)}" for name, rows in by_file.items())


def _listed(rows: list[int]) -> str:
    shown = [str(r) for r in rows[:3]] + (["..."] if len(rows) > 3 else [])
    return shown[0] if len(shown) == 1 else ", ".join(shown[:-1]) + " and " + shown[-1]


def find_duplicate_ids(files: list[InputFile], id_column: str) -> DuplicateIds | None:
    """The input's repeated ids (None: every id is unique). Rows without an id (a malformed text
    record, a null) are not counted here: they are error rows of their own."""
    chunks = [keys for keys, _, _, _ in _id_batches(files, id_column)]
    if not chunks:
        return None
    keys = np.sort(np.concatenate(chunks))
    repeats = keys[1:] == keys[:-1]
    if not repeats.any():
        return None
    repeated = np.unique(keys[1:][repeats])
    found = _confirm(files, id_column, repeated)
    if found is None:
        return None  # only hash collisions: the ids themselves all differ
    rows, ids, examples = found
    return DuplicateIds(rows=rows, ids=ids, examples=examples)


def _confirm(files: list[InputFile], id_column: str, repeated: np.ndarray
             ) -> tuple[int, int, list[tuple[Any, list[tuple[str, int]]]]] | None:
    """The second pass: the rows whose key repeats, grouped by their real id. Returns (rows
    repeating an id, distinct repeated ids, examples), or None when no real id repeats."""
    where: dict[Any, list[tuple[str, int]]] = {}
    for keys, values, rows, path in _id_batches(files, id_column):
        hit = np.isin(keys, repeated)
        if not hit.any():
            continue
        idx = np.flatnonzero(hit)
        for value, row in zip(values.take(pa.array(idx)).to_pylist(), rows.take(pa.array(idx)).to_pylist()):
            where.setdefault(_hashable(value), []).append((path, row))
    real = {value: places for value, places in where.items() if len(places) > 1}
    if not real:
        return None
    rows = sum(len(places) - 1 for places in real.values())
    examples = [(value, places) for value, places in list(real.items())[:_EXAMPLES]]
    return rows, len(real), examples


def _id_batches(files: list[InputFile], id_column: str) -> Iterator[tuple[np.ndarray, pa.Array, pa.Array, str]]:
    """(keys, ids, row numbers, file) per batch of rows that have an id: an integer id is its own
    key, any other id's key is its hash."""
    for f in files:
        if not f.num_rows:
            continue
        for table, rows, _ in read_rows(f, [(0, f.num_rows)], [id_column], _READ_ROWS, on_unreadable="skip",
                                        id_column=id_column):
            if table is None or id_column not in table.column_names:
                continue
            ids = table.column(id_column).combine_chunks()
            if ids.null_count:
                present = ids.is_valid()
                ids, rows = ids.filter(present), rows.filter(present)
            if len(ids):
                yield _keys(ids), ids, rows, f.path


def _keys(ids: pa.Array) -> np.ndarray:
    if pa.types.is_integer(ids.type):
        return ids.cast(pa.int64(), safe=False).to_numpy(zero_copy_only=False).view(np.uint64)
    values = ids.to_pylist()
    return np.fromiter((hash(_hashable(v)) for v in values), dtype=np.int64, count=len(values)).view(np.uint64)


def _hashable(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_hashable(v) for v in value)
    if isinstance(value, dict):
        return tuple(sorted((k, _hashable(v)) for k, v in value.items()))
    return value
