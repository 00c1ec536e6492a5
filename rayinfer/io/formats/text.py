"""JSON Lines and CSV inputs, read in blocks of ``TEXT_CHUNK_ROWS`` records.

Text formats have no random access of their own: when the job is planned, one pass over each
file finds the byte offset where each block starts (and, for CSV, where quoted values span
lines), so that a work unit, a resume or a retry reads only the blocks that hold its rows. A
compressed file is indexed through its codec (offsets into the decompressed stream) and read
forward (``_Forward``): a stream cannot seek. A JSON line or CSV record that does not parse, or
whose values do not fit the column types, is a *malformed* row: it becomes an error row naming
file and line, and the rest of its block goes on."""

from __future__ import annotations

import csv
import io
import json
import re
from collections import Counter
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from rayinfer.errors import InputError, RowError
from rayinfer.io.formats.base import Chunks, Piece, Source, input_file, null_id, open_stream

TEXT_CHUNK_ROWS = 65_536


SAMPLE_BYTES = 1 << 20  # text formats: column types are inferred from about this much of the first file


_READ_BLOCK = 8 << 20


def index_text(path: str, is_csv: bool, compression: str | None = None) -> tuple[bytes, list[int], list[int], list[int]]:
    """One pass over a text file: the CSV header, and for every TEXT_CHUNK_ROWS-th record its
    byte offset and line number (then the end), and the records per chunk. Blank lines are not
    records; in CSV a record goes on over line ends inside quotes (RFC 4180: "" is a quote).
    A compressed file is read through its codec: its offsets are into the decompressed bytes."""
    header_lines: list[bytes] = []
    header = b""
    offsets: list[int] = []
    lines: list[int] = []
    counts: list[int] = []
    pos = line_no = records = 0
    in_quotes = False
    need_header = is_csv
    for raw in _lines(path, compression):
        start, continuing = pos, in_quotes
        pos += len(raw) + 1
        line_no += 1
        if is_csv and raw.count(b'"') % 2:
            in_quotes = not in_quotes
        if not continuing and not raw.strip():
            continue
        if need_header:
            header_lines.append(raw)
            if not in_quotes:
                header, need_header = b"\n".join(header_lines) + b"\n", False
            continue
        if continuing:
            continue
        if records % TEXT_CHUNK_ROWS == 0:
            offsets.append(start)
            lines.append(line_no)
            counts.append(0)
        counts[-1] += 1
        records += 1
    offsets.append(pos)
    if is_csv and not header:
        raise InputError(f"input file {path!r} is an empty CSV file (no header line)")
    return header, offsets, lines, counts


def _lines(path: str, compression: str | None) -> Iterator[bytes]:
    rest = b""
    with open_stream(path, compression) as stream:
        while block := _read(stream, path, _READ_BLOCK):
            parts = (rest + block).split(b"\n")
            rest = parts.pop()
            yield from parts
    if rest:
        yield rest


def _read(stream: Any, path: str, n: int) -> bytes:
    try:
        return stream.read(n)
    except OSError as exc:  # a damaged stream (bad gzip data, a cut-off file) when the job is planned
        raise InputError(f"input file {path!r} cannot be read to its end ({' '.join(str(exc).split())}): is it "
                         "damaged or cut off?") from None


def read_range(path: str, start: int, stop: int, compression: str | None = None) -> bytes:
    """Bytes [start, stop) of a file (of its decompressed stream where ``compression`` is set)."""
    if compression is None:
        with input_file(path) as f:
            f.seek(start)
            return f.read(stop - start)
    with open_stream(path, compression) as stream:
        return _Forward(stream).read(start, stop)


class _Forward:
    """A compressed stream read forward: byte ranges at or after its position are reached by
    decompressing up to them (what a chunk of a compressed file costs: the stream from where the
    reader is, so a unit that starts inside the file first decompresses what comes before it)."""

    def __init__(self, stream: Any) -> None:
        self.stream, self.pos = stream, 0

    def read(self, start: int, stop: int) -> bytes:
        while self.pos < start:
            skipped = self.stream.read(min(_READ_BLOCK, start - self.pos))
            if not skipped:
                raise OSError(f"the stream ends at byte {self.pos}, before {start}")
            self.pos += len(skipped)
        data = self.stream.read(stop - start)
        self.pos += len(data)
        if len(data) < stop - start:
            raise OSError(f"the stream ends at byte {self.pos}, before {stop}")
        return data


def infer_schema(path: str, source: Source, column_types: dict[str, pa.DataType]) -> pa.Schema:
    """Column types from about SAMPLE_BYTES of the file's first records (``column_types`` win)."""
    end = source.offsets[-1]
    start = source.offsets[0] if len(source.offsets) > 1 else end
    sample = read_range(path, start, min(end, start + SAMPLE_BYTES), source.compression) if end > start else b""
    if end > start + SAMPLE_BYTES:
        sample = sample[: sample.rfind(b"\n") + 1]  # whole lines (a CSV value may span lines: see below)
    try:
        if source.format == "csv":
            if end > start + SAMPLE_BYTES:  # cut after a line where the quotes are balanced
                sample = _balanced_prefix(sample)
            skip_bad = pacsv.ParseOptions(delimiter=source.delimiter, newlines_in_values=True,
                                          invalid_row_handler=lambda row: "skip")  # malformed rows type nothing
            inferred = pacsv.read_csv(io.BytesIO(source.header + sample), parse_options=skip_bad,
                                      convert_options=pacsv.ConvertOptions(column_types=column_types)).schema
        else:
            inferred = _json_schema([line for line in sample.split(b"\n") if _is_object(line)])
    except pa.ArrowInvalid as exc:
        raise InputError(f"input file {path!r}: cannot infer its column types from its first lines "
                         f"({' '.join(str(exc).split())}); give them in input.column_types") from None
    # a column null in every sampled row is text until input.column_types says otherwise
    fields = [pa.field(f.name, column_types.get(f.name, pa.string() if pa.types.is_null(f.type) else f.type))
              for f in inferred]
    return pa.schema(fields + [pa.field(n, t) for n, t in column_types.items() if n not in inferred.names])


def _json_schema(lines: list[bytes]) -> pa.Schema:
    """The sample's schema; where its lines disagree on a column's type (a number where the others
    have text), the type most lines have: the others will be malformed rows."""
    def read(data: bytes) -> pa.Table:
        return pajson.read_json(io.BytesIO(data), read_options=pajson.ReadOptions(block_size=len(data) + 1))

    try:
        return read(b"".join(line + b"\n" for line in lines)).schema if lines else pa.schema([])
    except pa.ArrowInvalid:
        votes: dict[str, Counter[pa.DataType]] = {}
        for line in lines:
            for f in read(line + b"\n").schema:
                if not pa.types.is_null(f.type):
                    votes.setdefault(f.name, Counter())[f.type] += 1
        return pa.schema([(name, _most_common(v)) for name, v in votes.items()])


def _most_common(types: Counter[pa.DataType]) -> pa.DataType:
    if set(types) <= {pa.int64(), pa.float64()}:  # JSON numbers: some with a fraction
        return pa.float64()
    return types.most_common(1)[0][0]


def _is_object(line: bytes) -> bool:
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False


def _balanced_prefix(sample: bytes) -> bytes:
    """The longest run of whole lines of ``sample`` that ends outside quotes."""
    quotes = cut = pos = 0
    for line in sample.split(b"\n")[:-1]:
        pos += len(line) + 1
        quotes += line.count(b'"')
        if quotes % 2 == 0:
            cut = pos
    return sample[:cut]


def _csv_parse(source: Source) -> pacsv.ParseOptions:
    return pacsv.ParseOptions(delimiter=source.delimiter, newlines_in_values=True)


class TextChunks(Chunks):
    """JSON Lines and CSV blocks: parsed whole by pyarrow; a block that fails is parsed record by
    record, so that each malformed record is found, named by its line and left out."""

    def __init__(self, path: str, source: Source, id_column: str | None = None) -> None:
        super().__init__(path, source, id_column)
        self._stream: Any = None  # a compressed file: the open stream, read forward
        self._forward: _Forward | None = None

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = self._forward = None

    def where(self, i: int, start: int, stop: int) -> str:
        return f"the block of rows {start}-{stop - 1} from line {self.source.lines[i]}"

    def _block(self, i: int) -> bytes:
        start, stop = self.source.offsets[i], self.source.offsets[i + 1]
        if self.source.compression is None:
            return read_range(self.path, start, stop)
        if self._forward is None or self._forward.pos > start:  # (re)start the stream
            self.close()
            self._stream = open_stream(self.path, self.source.compression)
            self._forward = _Forward(self._stream)
        return self._forward.read(start, stop)

    def chunk(self, i: int, columns: list[str], batch_rows: int) -> Iterator[Piece]:
        block = self._block(i)
        try:
            table = self._parse(block)
            piece = Piece(table)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            piece = self._parse_records(block, self.source.lines[i])
        self._null_ids(piece, block, self.source.lines[i])
        table = piece.table.select(columns)
        for start in range(0, table.num_rows, batch_rows):
            problems = {k - start: v for k, v in piece.problems.items() if start <= k < start + batch_rows}
            yield Piece(table.slice(start, batch_rows), problems)

    def _null_ids(self, piece: Piece, block: bytes, first_line: int) -> None:
        """Mark the records whose id is null (and that are not malformed already), naming their lines."""
        name = self.id_column
        if name is None or name not in piece.table.column_names or not piece.table.column(name).null_count:
            return
        nulls = set(pc.indices_nonzero(pc.is_null(piece.table.column(name))).to_pylist()) - set(piece.problems)
        for k, (line_no, _) in enumerate(_records(block, first_line, self.source.format == "csv")):
            if k in nulls:
                piece.problems[k] = null_id(f"line {line_no}", name)

    def _parse(self, block: bytes) -> pa.Table:
        schema = self.source.schema
        assert schema is not None
        if self.source.format == "csv":
            return pacsv.read_csv(
                io.BytesIO(self.source.header + block), parse_options=_csv_parse(self.source),
                convert_options=pacsv.ConvertOptions(column_types=schema, include_columns=schema.names,
                                                     include_missing_columns=True),  # null where a file lacks one
            ).select(schema.names)
        return pajson.read_json(
            io.BytesIO(block), read_options=pajson.ReadOptions(block_size=max(len(block) + 1, 1 << 16)),
            parse_options=pajson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore"),
        ).select(schema.names)

    def _parse_records(self, block: bytes, first_line: int) -> Piece:
        schema = self.source.schema
        assert schema is not None
        tables, malformed = [], {}
        for line_no, record in _records(block, first_line, self.source.format == "csv"):
            problem = None
            if self.source.format == "jsonl":
                try:
                    if not isinstance(json.loads(record), dict):
                        problem = "not a JSON object"
                except json.JSONDecodeError as exc:
                    problem = f"not valid JSON ({exc.msg} at column {exc.colno})"
                except ValueError as exc:
                    problem = f"not valid JSON ({exc})"
            if problem is None:
                try:
                    table = self._parse(record)
                    if table.num_rows != 1:
                        problem = f"{table.num_rows} rows where one was expected"
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                    problem = " ".join(str(exc).split())
            if problem is not None:
                malformed[len(tables)] = RowError(f"line {line_no}: {problem}", "malformed")
                table = self._null_row(record)
            tables.append(table.cast(schema))
        return Piece(pa.concat_tables(tables) if tables else schema.empty_table(), malformed)

    def _null_row(self, record: bytes) -> pa.Table:
        """The row a malformed record stands as: all nulls but its id where it can be recovered
        safely: a JSON object's top-level id pair that comes before the fault, a CSV record's
        first field when the id is the first column (nothing to its left can shift it)."""
        schema = self.source.schema
        assert schema is not None
        name = self.id_column
        value: Any = None
        if name is not None and name in schema.names:
            if self.source.format == "jsonl":
                value = _json_field(record, name)
            elif schema.names[0] == name:
                value = next(csv.reader([record.decode("utf-8", "replace")], delimiter=self.source.delimiter), [None])[0]
        if value is not None:
            try:
                column = pa.array([value]).cast(schema.field(name).type)
                return pa.Table.from_pylist([{}], schema=schema).set_column(schema.get_field_index(name), name, column)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
                pass
        return pa.Table.from_pylist([{}], schema=schema)


_SPACE = re.compile(r"\s*")


def _json_field(record: bytes, name: str) -> Any:
    """The scalar value of the top-level key ``name`` of a JSON object that may not parse as a
    whole (cut off after that key, a later value of the wrong type): its pairs are decoded one by
    one up to the first fault. None when it is not found before the fault or is not a scalar."""
    text, decoder = record.decode("utf-8", "replace"), json.JSONDecoder()
    pos = _SPACE.match(text, 0).end()  # type: ignore[union-attr]
    if not text.startswith("{", pos):
        return None
    pos += 1
    while True:
        try:
            key, pos = decoder.raw_decode(text, _SPACE.match(text, pos).end())  # type: ignore[union-attr]
            pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos:pos + 1] != ":":
                return None
            value, pos = decoder.raw_decode(text, _SPACE.match(text, pos + 1).end())  # type: ignore[union-attr]
        except ValueError:
            return None
        if key == name:
            return value if isinstance(value, (str, int, float)) and not isinstance(value, bool) else None
        pos = _SPACE.match(text, pos).end()  # type: ignore[union-attr]
        if text[pos:pos + 1] != ",":
            return None
        pos += 1


def _records(block: bytes, first_line: int, is_csv: bool) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of each record of a block, blank lines skipped."""
    line_no, pending, start, quotes = first_line - 1, b"", 0, 0
    for raw in block.split(b"\n"):
        line_no += 1
        if not pending and not raw.strip():
            continue
        if not pending:
            start = line_no
        pending += raw + b"\n"
        quotes += raw.count(b'"') if is_csv else 0
        if quotes % 2 == 0:
            yield start, pending if is_csv else pending.strip()
            pending, quotes = b"", 0
    if pending.strip():
        yield start, pending
