"""The one reader: a file's rows in given row ranges, in input order, in batches."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import pyarrow as pa

from rayinfer.errors import InputError, RowError, UnreadableInput
from rayinfer.io.formats import open_chunks
from rayinfer.io.formats.base import Piece, null_id
from rayinfer.io.ranges import Ranges, clip_ranges, merge_ranges, numbers
from rayinfer.io.scan import InputFile

READ_BATCH_ROWS = 4096


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
    conform = _conformer(file, columns)
    if conform is not None:
        columns = [c for c in columns if c in file.conform[0].names]  # type: ignore[index]
    try:
        chunk_start = 0
        for i, n in enumerate(file.chunk_rows):
            chunk_stop = chunk_start + n
            wanted = clip_ranges(ranges, chunk_start, chunk_stop)
            if wanted:
                offset = chunk_start
                try:
                    for piece in reader.chunk(i, columns, batch_rows):
                        if conform is not None:
                            piece = Piece(conform(piece.table), piece.problems)
                        if id_column is not None:
                            piece = _null_ids(piece, id_column, offset)
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
                        yield RowBatch(None, numbers(rest), problem)
            chunk_start = chunk_stop
            if not ranges or chunk_start >= ranges[-1][1]:
                break
        yield from pending.flush()
    finally:
        reader.close()


def _conformer(file: InputFile, columns: list[str]) -> Callable[[pa.Table], pa.Table] | None:
    """For a file whose schema differs from the dataset's (``InputFile.conform``): a function that
    makes its pieces the dataset's (its types; null columns for those the file lacks)."""
    if file.conform is None:
        return None
    own, dataset = file.conform
    fields = [dataset.field(c) for c in columns]

    def conform(table: pa.Table) -> pa.Table:
        arrays = [table.column(f.name).cast(f.type) if f.name in own.names else pa.nulls(table.num_rows, f.type)
                  for f in fields]
        return pa.Table.from_arrays(arrays, schema=pa.schema(fields))

    return conform


def _null_ids(piece: Piece, id_column: str, lo: int) -> Piece:
    """``piece`` (its first row is input row ``lo``) with its rows whose id is null marked as
    problems, where the format's reader has not (Parquet and Arrow files with null ids are refused
    when the job is planned: this catches a file rewritten since)."""
    ids = piece.table.column(id_column) if id_column in piece.table.column_names else None
    if ids is None or not ids.null_count:
        return piece
    import pyarrow.compute as pc

    problems = dict(piece.problems)
    for k in pc.indices_nonzero(pc.is_null(ids)).to_pylist():
        problems.setdefault(k, null_id(f"row {lo + k}", id_column))
    return Piece(piece.table, problems)


def _in_order(path: str, piece: Piece, lo: int, a: int, b: int, pending: "_Pending") -> Iterator[RowBatch]:
    """Rows [a, b) of ``piece`` (whose first row is input row ``lo``): good rows join ``pending``;
    a malformed row first flushes what is pending, then comes out alone, so order is kept."""
    start = a
    for row in sorted(lo + k for k in piece.problems if a <= lo + k < b):
        if row > start:
            yield from pending.add(piece.table.slice(start - lo, row - start), numbers([(start, row)]))
        yield from pending.flush()
        what = piece.problems[row - lo]
        problem = RowError(f"input file {path!r}, {what}", what.kind)
        yield RowBatch(piece.table.slice(row - lo, 1), numbers([(row, row + 1)]), problem)
        start = row + 1
    if b > start:
        yield from pending.add(piece.table.slice(start - lo, b - start), numbers([(start, b)]))


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
