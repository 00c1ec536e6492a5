"""Finding the input Parquet files, checking their schemas, and cutting them into work units.

A work unit is a range of rows of one file (whole row groups where they are small enough).
Every row read comes with its coordinates (file, row index within the file), so output parts
can record exactly which input rows they cover: that is what makes commits deterministic and
resume possible without keeping every id in memory.
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

from rayinfer.errors import InputError, UnreadableInput
from rayinfer.storage import filesystem, uri_for

READ_BATCH_ROWS = 4096
UNIT_TARGET_ROWS = 1_000_000

Ranges = list[tuple[int, int]]
"""Sorted, non-overlapping half-open row ranges [start, stop)."""


@dataclass(frozen=True)
class InputFile:
    path: str  # the key used in coverage: an absolute local path or a URI
    num_rows: int
    row_group_rows: tuple[int, ...]
    fingerprint: str = ""  # "size:mtime_ns": a rewritten file gets another (resume checks it)


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


def fingerprint(path: str) -> str:
    fs, fpath = _filesystem(path)
    info = fs.get_file_info(fpath)
    mtime = info.mtime_ns if info.mtime is not None else 0
    return f"{info.size}:{mtime}"


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
        files.append(InputFile(path=f, num_rows=md.num_rows, row_group_rows=rg_rows, fingerprint=fingerprint(f)))
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


def make_units(
    files: list[InputFile], coverage: dict[str, Ranges] | None = None, unit_rows: int = UNIT_TARGET_ROWS
) -> list[dict[str, Any]]:
    """Cut files into work units of about ``unit_rows`` rows; drop the units resume finds covered.

    Consecutive row groups are joined up to ``unit_rows``; a row group larger than that is split
    into equal row ranges (each unit then decodes the whole row group and keeps its slice: the
    price of feeding many actors from a small file). A unit never spans two files.
    """
    coverage = coverage or {}
    unit_rows = max(1, unit_rows)
    units: list[dict[str, Any]] = []

    def add(f: InputFile, start: int, stop: int) -> None:
        done = coverage.get(f.path, [])
        todo = (stop - start) - covered_count(done, start, stop)
        if todo > 0:
            units.append({"file": f.path, "fingerprint": f.fingerprint, "start": start, "stop": stop, "todo": todo,
                          "covered": [list(r) for r in done if r[1] > start and r[0] < stop]})

    for f in files:
        run_start = offset = 0
        for n in f.row_group_rows:
            if offset > run_start and offset + n - run_start > unit_rows:
                add(f, run_start, offset)
                run_start = offset
            if n > unit_rows:  # one big row group: equal slices of it
                pieces = -(-n // unit_rows)
                size = -(-n // pieces)
                for a in range(offset, offset + n, size):
                    add(f, a, min(a + size, offset + n))
                run_start = offset + n
            offset += n
        if offset > run_start:
            add(f, run_start, offset)
    return units


def read_unit(
    unit: dict[str, Any], columns: list[str], batch_rows: int = READ_BATCH_ROWS, on_unreadable: str = "fail"
) -> Iterator[tuple[pa.Table | None, pa.Array, str | None]]:
    """Yield the unit's rows (only ``columns``) as (table, input row indices, None) in tables of at
    most ``batch_rows`` rows; rows in ``unit["covered"]`` are skipped.

    A row group whose data cannot be read (its footer was fine: a damaged page, a bad
    decompression) raises UnreadableInput naming the file, row group and rows; with
    ``on_unreadable="skip"`` its rows not yet read come out as (None, row indices, message)."""
    pf = open_parquet(unit["file"])
    md = pf.metadata
    start, stop = unit["start"], unit["stop"]
    covered = [tuple(r) for r in unit.get("covered") or []]
    pending: list[tuple[pa.Table, pa.Array]] = []
    pending_rows = 0
    group_start = 0
    for i in range(md.num_row_groups):
        group_stop = group_start + md.row_group(i).num_rows
        if group_stop <= start or group_start >= stop:
            group_start = group_stop
            continue
        offset = group_start
        batches = pf.iter_batches(batch_size=batch_rows, row_groups=[i], columns=columns, use_threads=False)
        while offset < min(group_stop, stop):
            try:
                rb = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:
                problem = (f"input file {unit['file']!r}, row group {i} (rows {group_start}-{group_stop - 1}) cannot "
                           f"be read: {' '.join(str(exc).split())}")
                if on_unreadable != "skip":
                    raise UnreadableInput(problem) from None
                rows = _uncovered(pa.array(range(max(start, offset), min(stop, group_stop)), pa.int64()), covered)
                if len(rows):
                    yield None, rows, problem
                break
            lo, hi = max(start, offset), min(stop, offset + rb.num_rows)
            table = pa.Table.from_batches([rb]).slice(lo - offset, max(0, hi - lo))
            rows = pa.array(range(lo, max(lo, hi)), type=pa.int64())
            offset += rb.num_rows
            if covered and len(rows):
                mask = _uncovered_mask(rows, covered)
                table, rows = table.filter(mask), rows.filter(mask)
            if table.num_rows:
                pending.append((table, rows))
                pending_rows += table.num_rows
            while pending_rows >= batch_rows:
                yield (*_take_rows(pending, batch_rows), None)
                pending_rows -= batch_rows
        group_start = group_stop
        if group_start >= stop:
            break
    while pending_rows:
        n = min(batch_rows, pending_rows)
        yield (*_take_rows(pending, n), None)
        pending_rows -= n


def read_rows(
    file: str, rows: list[int], columns: list[str], batch_rows: int = READ_BATCH_ROWS, on_unreadable: str = "fail"
) -> Iterator[tuple[pa.Table | None, pa.Array, str | None]]:
    """Like ``read_unit``, for given input rows (ascending) of ``file``: only the row groups that
    hold them are decoded. Rows the file no longer has are an InputError (it changed)."""
    pf = open_parquet(file)
    md = pf.metadata
    if rows and rows[-1] >= md.num_rows:
        raise InputError(f"input file {file!r} has {md.num_rows} rows now; row {rows[-1]} is gone (the file changed)")
    pending: list[tuple[pa.Table, pa.Array]] = []
    pending_rows = 0
    group_start, k = 0, 0
    for i in range(md.num_row_groups):
        group_stop = group_start + md.row_group(i).num_rows
        j = k
        while j < len(rows) and rows[j] < group_stop:
            j += 1
        if j > k:
            wanted = pa.array(rows[k:j], pa.int64())
            try:
                group = pf.read_row_group(i, columns=columns, use_threads=False)
            except (pa.ArrowException, OSError) as exc:
                problem = (f"input file {file!r}, row group {i} (rows {group_start}-{group_stop - 1}) cannot "
                           f"be read: {' '.join(str(exc).split())}")
                if on_unreadable != "skip":
                    raise UnreadableInput(problem) from None
                yield None, wanted, problem
            else:
                pending.append((group.take(pc.subtract(wanted, group_start)), wanted))
                pending_rows += j - k
            k = j
        while pending_rows >= batch_rows:
            yield (*_take_rows(pending, batch_rows), None)
            pending_rows -= batch_rows
        group_start = group_stop
        if k == len(rows):
            break
    while pending_rows:
        n = min(batch_rows, pending_rows)
        yield (*_take_rows(pending, n), None)
        pending_rows -= n


def _uncovered_mask(rows: pa.Array, covered: list[tuple[int, int]]) -> pa.Array:
    mask = pa.array([True] * len(rows))
    for a, b in covered:
        mask = pc.and_(mask, pc.invert(pc.and_(pc.greater_equal(rows, a), pc.less(rows, b))))
    return mask


def _uncovered(rows: pa.Array, covered: list[tuple[int, int]]) -> pa.Array:
    return rows.filter(_uncovered_mask(rows, covered)) if covered and len(rows) else rows


def _take_rows(pending: list[tuple[pa.Table, pa.Array]], n: int) -> tuple[pa.Table, pa.Array]:
    """Take the first ``n`` rows off ``pending`` (a queue of (table, rows) pieces), in order."""
    tables, rows, need = [], [], n
    while need:
        table, r = pending[0]
        if table.num_rows <= need:
            pending.pop(0)
            tables.append(table)
            rows.append(r)
            need -= table.num_rows
        else:
            tables.append(table.slice(0, need))
            rows.append(r.slice(0, need))
            pending[0] = (table.slice(need), r.slice(need))
            need = 0
    table = tables[0] if len(tables) == 1 else pa.concat_tables(tables).combine_chunks()
    return table, (rows[0] if len(rows) == 1 else pa.concat_arrays(rows))
