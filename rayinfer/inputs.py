"""Finding the input Parquet files, checking their schemas, and cutting them into work units.

A work unit is a run of row groups of one file. Each row read carries its coordinates
(file, row index within the file) in two hidden columns, so output parts can record
exactly which input rows they cover: that is what makes commits deterministic and resume
possible without keeping every id in memory.
"""

from __future__ import annotations

import glob as globlib
import os
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayinfer.errors import InputError
from rayinfer.storage import filesystem, uri_for

FILE_COL = "__rayinfer_file"
ROW_COL = "__rayinfer_row"
READ_BATCH_ROWS = 4096
UNIT_TARGET_ROWS = 65536

Ranges = list[tuple[int, int]]
"""Sorted, non-overlapping half-open row ranges [start, stop)."""


@dataclass(frozen=True)
class InputFile:
    path: str  # the key used in coverage: an absolute local path or a URI
    num_rows: int
    row_group_rows: tuple[int, ...]


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(path, "input.path", InputError)


def list_files(path: str) -> list[str]:
    """The Parquet files a spec's ``input.path`` names, sorted; an InputError when there are none."""
    if "://" not in path and any(ch in path for ch in "*?["):
        found = sorted(
            os.path.abspath(p) for p in globlib.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(p)
        )
        if not found:
            raise InputError(f"input.path {path!r}: the glob matches no files")
        return found
    fs, fpath = _filesystem(path)
    info = fs.get_file_info(fpath)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.path {path!r} does not exist")
    if info.type == pafs.FileType.File:
        return [uri_for(fpath, path)]
    selector = pafs.FileSelector(fpath, recursive=True)
    files = [
        uri_for(i.path, path)
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File
        and not any(part.startswith((".", "_")) for part in os.path.relpath(i.path, fpath).split(os.sep))
        and i.path.endswith((".parquet", ".pq", ".parq"))
    ]
    if not files:
        raise InputError(f"input.path {path!r} is a folder with no .parquet files in it")
    return sorted(files)


def open_parquet(path: str) -> pq.ParquetFile:
    fs, fpath = _filesystem(path)
    try:
        return pq.ParquetFile(fs.open_input_file(fpath))
    except FileNotFoundError:
        raise InputError(f"input file {path!r} disappeared") from None
    except PermissionError:
        raise InputError(f"input file {path!r} is not readable (permission denied)") from None
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"input file {path!r} is not a readable Parquet file: {exc}") from None


def scan(path: str) -> tuple[list[InputFile], pa.Schema]:
    """Read every file's footer: row counts, row groups, and one schema they all agree on."""
    files: list[InputFile] = []
    schema: pa.Schema | None = None
    first = ""
    for f in list_files(path):
        pf = open_parquet(f)
        md = pf.metadata
        rg_rows = tuple(md.row_group(i).num_rows for i in range(md.num_row_groups))
        files.append(InputFile(path=f, num_rows=md.num_rows, row_group_rows=rg_rows))
        fschema = pf.schema_arrow
        if schema is None:
            schema, first = fschema, f
        else:
            for field in schema:
                other = fschema.field(field.name) if field.name in fschema.names else None
                if other is None:
                    raise InputError(f"input file {f!r} lacks column {field.name!r} that {first!r} has")
                if other.type != field.type:
                    raise InputError(
                        f"column {field.name!r} is {other.type} in {f!r} but {field.type} in {first!r}"
                    )
    assert schema is not None
    return files, schema


def is_string_type(t: pa.DataType) -> bool:
    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def check_columns(schema: pa.Schema, needed: dict[str, str | None], where: str) -> None:
    """``needed`` maps a column to the dtype it must have ("string", a pyarrow type name, or None)."""
    for column, dtype in needed.items():
        if column not in schema.names:
            raise InputError(
                f"{where}: column {column!r} is not in the input. Columns: {', '.join(schema.names)}"
            )
        actual = schema.field(column).type
        if dtype == "string" and not is_string_type(actual):
            raise InputError(f"{where}: column {column!r} must be a string column, but it is {actual}")
        if dtype not in (None, "string") and str(actual) != dtype:
            raise InputError(f"{where}: column {column!r} must be {dtype}, but it is {actual}")


# ---- coverage: which input rows are already committed ------------------------------------


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


def make_units(files: list[InputFile], coverage: dict[str, Ranges] | None = None) -> list[dict[str, Any]]:
    """Cut files into units of whole row groups; drop the units resume finds fully covered."""
    coverage = coverage or {}
    units: list[dict[str, Any]] = []
    for f in files:
        done = coverage.get(f.path, [])
        start = 0
        group: list[int] = []
        group_start = 0
        group_rows = 0
        for i, n in enumerate(f.row_group_rows):
            if not group:
                group_start = start
            group.append(i)
            group_rows += n
            start += n
            if group_rows >= UNIT_TARGET_ROWS or i == len(f.row_group_rows) - 1:
                todo = group_rows - covered_count(done, group_start, group_start + group_rows)
                if todo > 0:
                    units.append(
                        {
                            "file": f.path,
                            "row_groups": list(group),
                            "start": group_start,
                            "rows": group_rows,
                            "todo": todo,
                            "covered": [list(r) for r in done if r[1] > group_start and r[0] < start],
                        }
                    )
                group, group_rows = [], 0
    return units


def read_unit(unit: dict[str, Any], columns: list[str]) -> Iterator[pa.Table]:
    """Yield the unit's rows (only ``columns``) with their coordinates, skipping covered rows."""
    pf = open_parquet(unit["file"])
    covered = [tuple(r) for r in unit.get("covered") or []]
    offset = unit["start"]
    for rb in pf.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=unit["row_groups"], columns=columns):
        n = rb.num_rows
        rows = pa.array(range(offset, offset + n), type=pa.int64())
        table = pa.Table.from_batches([rb])
        offset += n
        if covered:
            mask = pa.array([True] * n)
            for a, b in covered:
                inside = pc.and_(pc.greater_equal(rows, a), pc.less(rows, b))
                mask = pc.and_(mask, pc.invert(inside))
            table, rows = table.filter(mask), rows.filter(mask)
            if table.num_rows == 0:
                continue
        table = table.append_column(FILE_COL, pa.array([unit["file"]] * table.num_rows, type=pa.string()))
        table = table.append_column(ROW_COL, rows)
        yield table
