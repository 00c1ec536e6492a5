"""Finding the input files, checking their schemas, and cutting them into work units.

The formats themselves (Parquet, Arrow IPC, Hugging Face ``save_to_disk`` folders, JSON Lines,
CSV) are read by ``rayinfer.formats``, all in chunks (row groups, record batches, blocks of
lines). A work unit is a range of rows of one file (whole chunks where they are small enough).
Every row read comes with its coordinates (file, row index within the file), so output parts
can record exactly which input rows they cover: that is what makes commits deterministic and
resume possible without keeping every id in memory.
"""

from __future__ import annotations

import glob as globlib
import json
import os
from dataclasses import dataclass
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from rayinfer.errors import InputError, RowError, UnreadableInput
from rayinfer.formats import FORMATS, Piece, Source, describe, format_of, open_chunks
from rayinfer.storage import filesystem, uri_for

READ_BATCH_ROWS = 4096
UNIT_TARGET_ROWS = 1_000_000

Ranges = list[tuple[int, int]]
"""Sorted, non-overlapping half-open row ranges [start, stop)."""


@dataclass(frozen=True)
class InputFile:
    path: str  # the key used in coverage: an absolute local path or a URI
    num_rows: int
    chunk_rows: tuple[int, ...]  # rows per chunk: row group, record batch or block of lines
    fingerprint: str = ""  # "size:mtime_ns": a rewritten file gets another (resume checks it)
    source: Source = Source("parquet")  # how its chunks are read


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(path, "input.path", InputError)


def list_files(path: str, fmt: str = "auto") -> list[tuple[str, str]]:
    """(file, format) of each input file a spec's ``input.path`` names, sorted; an InputError
    when there are none. A folder with a ``state.json`` is a Hugging Face ``save_to_disk``
    dataset: its Arrow files, in the order state.json lists them (other .arrow files there, such
    as the caches ``map()`` leaves, are not data)."""
    if "://" not in path and any(ch in path for ch in "*?["):
        found = sorted(
            os.path.abspath(p) for p in globlib.glob(os.path.expanduser(path), recursive=True) if os.path.isfile(p)
        )
        if not found:
            raise InputError(f"input.path {path!r}: the glob matches no files")
        return _of_one_format(path, [(f, format_of(f, fmt)) for f in found], fmt)
    fs, fpath = _filesystem(path)
    info = fs.get_file_info(fpath)
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"input.path {path!r} does not exist")
    if info.type == pafs.FileType.File:
        found_fmt = format_of(fpath, fmt)
        if found_fmt is None:
            raise InputError(f"input.path {path!r}: cannot tell its format from the extension; set input.format "
                             f"({', '.join(FORMATS)})")
        return [(uri_for(fpath, path), found_fmt)]
    hf = _hugging_face_files(fs, fpath, path)
    if hf is not None:
        return [(f, "arrow") for f in hf]
    selector = pafs.FileSelector(fpath, recursive=True)
    files = [
        (uri_for(i.path, path), format_of(i.path, fmt))
        for i in fs.get_file_info(selector)
        if i.type == pafs.FileType.File
        and not any(part.startswith((".", "_")) for part in os.path.relpath(i.path, fpath).split(os.sep))
    ]
    files = sorted((f, k) for f, k in files if k is not None)
    if not files:
        kinds = "files of format " + fmt if fmt != "auto" else "input files (.parquet, .arrow, .jsonl, .csv, ...)"
        raise InputError(f"input.path {path!r} is a folder with no {kinds} in it")
    return _of_one_format(path, files, fmt)


def _of_one_format(path: str, files: list[tuple[str, str | None]], fmt: str) -> list[tuple[str, str]]:
    kinds = sorted({k for _, k in files if k is not None})
    if len(kinds) > 1:
        raise InputError(f"input.path {path!r} holds files of several formats ({', '.join(kinds)}): "
                         "point it at one kind (a glob such as dir/*.parquet) or set input.format")
    unknown = [f for f, k in files if k is None]
    if unknown:
        raise InputError(f"input.path {path!r}: cannot tell the format of {unknown[0]!r} from its extension; "
                         f"set input.format ({', '.join(FORMATS)})")
    return [(f, k) for f, k in files if k is not None]


def _hugging_face_files(fs: pafs.FileSystem, folder: str, path: str) -> list[str] | None:
    """The data files of a ``datasets`` save_to_disk folder (None: the folder is not one)."""
    def read_json(name: str) -> Any:
        try:
            with fs.open_input_stream(f"{folder}/{name}") as f:
                return json.loads(f.read())
        except FileNotFoundError:
            return None
        except ValueError as exc:
            raise InputError(f"input.path {path!r}: {name} is not valid JSON ({exc})") from None

    splits = read_json("dataset_dict.json")
    if splits is not None:
        names = ", ".join(splits.get("splits", []))
        raise InputError(f"input.path {path!r} is a Hugging Face DatasetDict; point it at one split's folder "
                         f"({names})")
    state = read_json("state.json")
    if state is None:
        return None
    data = [d.get("filename") for d in state.get("_data_files") or []]
    if not data or not all(isinstance(d, str) for d in data):
        raise InputError(f"input.path {path!r}: its state.json lists no data files (_data_files)")
    return [uri_for(f"{folder}/{name}", path) for name in data]


def fingerprint(path: str) -> str:
    fs, fpath = _filesystem(path)
    info = fs.get_file_info(fpath)
    mtime = info.mtime_ns if info.mtime is not None else 0
    return f"{info.size}:{mtime}"


def scan(path: str, fmt: str = "auto", column_types: dict[str, str] | None = None,
         delimiter: str | None = None) -> tuple[list[InputFile], pa.Schema]:
    """Describe every input file (rows per chunk; for text formats the index of their blocks) and
    find one schema they all agree on. JSON Lines and CSV columns are typed once, from the first
    file (``column_types`` win), and every file is parsed into that schema."""
    types = {name: _data_type(name, t) for name, t in (column_types or {}).items()}
    files: list[InputFile] = []
    schema: pa.Schema | None = None
    text_schema: pa.Schema | None = None
    first = ""
    for f, kind in list_files(path, fmt):
        chunk_rows, fschema, source = describe(f, kind, types, delimiter, text_schema)
        if kind in ("jsonl", "csv"):
            if source.schema is None:  # an empty text file: it has no rows, its columns are the others'
                files.append(InputFile(path=f, num_rows=0, chunk_rows=(), fingerprint=fingerprint(f), source=source))
                continue
            text_schema = fschema
        elif types:
            raise InputError(f"input.column_types is for JSON Lines and CSV inputs; {f!r} is {kind}, which "
                             "carries its own types")
        files.append(InputFile(path=f, num_rows=sum(chunk_rows), chunk_rows=chunk_rows, fingerprint=fingerprint(f),
                               source=source))
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
    return files, schema if schema is not None else pa.schema([])


def _data_type(column: str, name: str) -> pa.DataType:
    try:
        return pa.type_for_alias(name)
    except ValueError:
        raise InputError(f"input.column_types.{column}: {name!r} is not an Arrow type name (string, int64, "
                         "float64, bool, timestamp[s], ...)") from None


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


def make_units(
    files: list[InputFile], coverage: dict[str, Ranges] | None = None, unit_rows: int = UNIT_TARGET_ROWS
) -> list[dict[str, Any]]:
    """Cut files into work units of about ``unit_rows`` rows; drop the rows resume finds covered.

    A unit is an input file and the row ranges of it to run (``ranges``, ascending). Consecutive
    chunks are joined up to ``unit_rows``; a chunk larger than that is split into equal row
    ranges (each unit then decodes the whole chunk and keeps its slice: the price of feeding many
    actors from a small file). A unit never spans two files.
    """
    coverage = coverage or {}
    unit_rows = max(1, unit_rows)
    units: list[dict[str, Any]] = []

    def add(f: InputFile, start: int, stop: int) -> None:
        todo = subtract_ranges([(start, stop)], coverage.get(f.path, []))
        if todo:
            units.append({"file": f.path, "fingerprint": f.fingerprint, "ranges": [list(r) for r in todo],
                          "todo": sum(b - a for a, b in todo)})

    for f in files:
        run_start = offset = 0
        for n in f.chunk_rows:
            if offset > run_start and offset + n - run_start > unit_rows:
                add(f, run_start, offset)
                run_start = offset
            if n > unit_rows:  # one big chunk: equal slices of it
                pieces = -(-n // unit_rows)
                size = -(-n // pieces)
                for a in range(offset, offset + n, size):
                    add(f, a, min(a + size, offset + n))
                run_start = offset + n
            offset += n
        if offset > run_start:
            add(f, run_start, offset)
    return units


@dataclass
class RowBatch:
    """Consecutive rows to run, as the reader yields them: ``rows`` are their input row numbers
    (coordinates within ``file``). Rows that could not be read have a ``problem`` (a malformed
    record's RowError, or a damaged chunk's text with ``on_unreadable: skip``); their ``table``
    holds what was recovered of them (the id, where it could be), or is None."""

    table: pa.Table | None
    rows: pa.Array
    problem: RowError | str | None = None

    def __iter__(self) -> Iterator[Any]:  # (table, rows, problem), as a tuple
        return iter((self.table, self.rows, self.problem))


def read_rows(
    file: InputFile, ranges: Ranges, columns: list[str], batch_rows: int = READ_BATCH_ROWS,
    on_unreadable: str = "fail", id_column: str | None = None,
) -> Iterator[RowBatch]:
    """THE reader: the rows of ``file`` in ``ranges`` (only ``columns``), strictly in input order,
    in batches of at most ``batch_rows`` rows. A work unit, a resume and a retry all read through
    here; the rows' order is what lets a part's footer (its row ranges) name every row it holds.

    Only the chunks that hold wanted rows are read. A malformed text record comes out in its
    place, alone, with its RowError (and its id where ``id_column`` could be recovered). A chunk
    whose data cannot be read (its footer was fine: a damaged page, a bad decompression) raises
    UnreadableInput naming the file, chunk and rows; with ``on_unreadable="skip"`` its rows not
    yet read come out in their place with the problem instead. Ranges past the file's end are
    an InputError (the file changed since its rows were counted)."""
    ranges = merge_ranges([tuple(r) for r in ranges])  # type: ignore[misc]
    if ranges and ranges[-1][1] > file.num_rows:
        raise InputError(f"input file {file.path!r} has {file.num_rows} rows now; row {ranges[-1][1] - 1} is gone "
                         "(the file changed)")
    pending = _Pending(batch_rows)
    reader = open_chunks(file.path, file.source, id_column)
    try:
        chunk_start = 0
        for i, n in enumerate(file.chunk_rows):
            chunk_stop = chunk_start + n
            wanted = clip_ranges(ranges, chunk_start, chunk_stop)
            if wanted:
                offset = chunk_start
                try:
                    for piece in reader.chunk(i, columns, batch_rows):
                        lo, offset = offset, offset + piece.table.num_rows
                        for a, b in clip_ranges(wanted, lo, offset):
                            yield from _in_order(file.path, piece, lo, a, b, pending)
                        if offset >= wanted[-1][1]:
                            break
                except (pa.ArrowException, OSError) as exc:
                    problem = (f"input file {file.path!r}, {reader.where(i, chunk_start, chunk_stop)} cannot be read: "
                               f"{' '.join(str(exc).split())}")
                    if on_unreadable != "skip":
                        raise UnreadableInput(problem) from None
                    rest = clip_ranges(wanted, offset, chunk_stop)
                    if rest:
                        yield from pending.flush()
                        yield RowBatch(None, _numbers(rest), problem)
            chunk_start = chunk_stop
            if not ranges or chunk_start >= ranges[-1][1]:
                break
        yield from pending.flush()
    finally:
        reader.close()


def _in_order(path: str, piece: Piece, lo: int, a: int, b: int, pending: "_Pending") -> Iterator[RowBatch]:
    """Rows [a, b) of ``piece`` (whose first row is input row ``lo``): good rows join ``pending``;
    a malformed row first flushes what is pending, then comes out alone, so order is kept."""
    start = a
    for row in sorted(lo + k for k in piece.malformed if a <= lo + k < b):
        if row > start:
            yield from pending.add(piece.table.slice(start - lo, row - start), _numbers([(start, row)]))
        yield from pending.flush()
        problem = RowError(f"input file {path!r}, {piece.malformed[row - lo]}", "malformed")
        yield RowBatch(piece.table.slice(row - lo, 1), _numbers([(row, row + 1)]), problem)
        start = row + 1
    if b > start:
        yield from pending.add(piece.table.slice(start - lo, b - start), _numbers([(start, b)]))


def _numbers(ranges: Ranges) -> pa.Array:
    import numpy as np

    return pa.array(np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges]), pa.int64())


class _Pending:
    """Good rows read but not yet yielded, cut into batches of ``batch_rows``."""

    def __init__(self, batch_rows: int) -> None:
        self.batch_rows = max(1, batch_rows)
        self.pieces: list[tuple[pa.Table, pa.Array]] = []
        self.rows = 0

    def add(self, table: pa.Table, rows: pa.Array) -> Iterator[RowBatch]:
        if table.num_rows:
            self.pieces.append((table, rows))
            self.rows += table.num_rows
        while self.rows >= self.batch_rows:
            yield RowBatch(*_take_rows(self.pieces, self.batch_rows))
            self.rows -= self.batch_rows

    def flush(self) -> Iterator[RowBatch]:
        while self.rows:
            n = min(self.batch_rows, self.rows)
            yield RowBatch(*_take_rows(self.pieces, n))
            self.rows -= n


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
