"""What every input format shares: a file's ``Source`` (what a reader needs beyond its path), the
``Piece`` of rows a reader yields, the chunk reader's interface, and opening input files."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs

from rayinfer.errors import InputError, RowError
from rayinfer.io.location import filesystem

FORMATS = ("parquet", "arrow", "jsonl", "csv")


EXTENSIONS = {
    ".parquet": "parquet", ".pq": "parquet", ".parq": "parquet",
    ".arrow": "arrow", ".feather": "arrow", ".ipc": "arrow",
    ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json",  # json: JSON Lines if its first line is an object
    ".csv": "csv", ".tsv": "csv",
}


COMPRESSIONS = {".gz": "gzip", ".bz2": "bz2", ".zst": "zstd", ".zstd": "zstd", ".xz": "xz", ".lz4": "lz4"}
"""Stream codecs of compressed JSON Lines and CSV files, by extension (pyarrow's, and Python's
lzma for xz). A ``.zip`` is an archive of files, not a stream: refused."""


@dataclass(frozen=True)
class Source:
    """What a reader needs beyond the path to read one input file's chunks."""

    format: str
    schema: pa.Schema | None = None  # text formats: the columns and types every row is parsed into
    offsets: tuple[int, ...] = ()  # text formats: where each chunk's first record starts, then the end
    lines: tuple[int, ...] = ()  # text formats: the line number (1-based) each chunk starts at
    header: bytes = b""  # CSV: the header record, put before each block that is parsed
    delimiter: str = ","
    compression: str | None = None  # text formats: the stream codec (COMPRESSIONS); offsets are into its output


@dataclass
class Piece:
    """Consecutive rows of a chunk. A row that cannot run (a malformed record: all nulls here but
    its id where it could be recovered; a row whose id is null) has its RowError in ``problems``,
    its text naming the row (``line 7: ...``), not the file."""

    table: pa.Table
    problems: dict[int, RowError] = field(default_factory=dict)  # row offset in the piece -> what is wrong


def null_id(where: str, column: str) -> RowError:
    """The problem of a row whose id is null (``where``: ``line 7``, ``row 6``)."""
    return RowError(f"{where}: its id (column {column!r}) is null; every row needs an id to be joined back to its input: "
                    "fill it in, then run rayinfer retry-errors", "null_id")


def compression_of(path: str) -> str | None:
    """The stream codec a file's extension names (``c4-train.00000-of-01024.json.gz``: gzip), or None."""
    return COMPRESSIONS.get(os.path.splitext(path)[1].lower())


def format_of(path: str, given: str) -> str | None:
    """The format of a file: ``given`` unless it is auto, else its extension's, under a
    compression extension (``.jsonl.zst``: jsonl); None: not an input file. ``json`` is a JSON
    file that ``resolve_json`` tells apart (JSON Lines, or one JSON document)."""
    if given != "auto":
        return given
    stem = os.path.splitext(path)[0] if compression_of(path) else path
    return EXTENSIONS.get(os.path.splitext(stem)[1].lower())


def open_stream(path: str, compression: str | None) -> Any:
    """A file's bytes as a stream (``read(n)``, ``close()``), decompressed where ``compression``
    names a codec: read in order, never copied to disk."""
    fs, fpath = open_input(path)
    try:
        if compression == "xz":
            return _Xz(fs.open_input_stream(fpath, compression=None))
        return fs.open_input_stream(fpath, compression=compression)
    except FileNotFoundError:
        raise InputError(f"input file {path!r} disappeared") from None
    except PermissionError:
        raise InputError(f"input file {path!r} is not readable (permission denied)") from None


class _Xz:
    """An xz stream (Python's lzma: pyarrow has no xz codec) whose damage is an OSError, as
    pyarrow's codecs report it."""

    def __init__(self, raw: Any) -> None:
        import lzma

        self.raw, self.error = raw, lzma.LZMAError
        self.stream = lzma.open(raw)

    def read(self, n: int = -1) -> bytes:
        try:
            return self.stream.read(n)
        except (self.error, EOFError) as exc:
            raise OSError(f"xz: {exc}") from None

    def close(self) -> None:
        self.stream.close()
        self.raw.close()

    def __enter__(self) -> "_Xz":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def resolve_json(path: str) -> str:
    """``jsonl`` for a ``.json`` (or ``.json.gz``, ...) file whose first line is a whole JSON
    object, as C4 and many crawls ship; an InputError for one JSON document (an array), which
    cannot be read in chunks. Only the first line is read."""
    import json

    stream = open_stream(path, compression_of(path))
    try:
        head = b""
        while b"\n" not in head and len(head) < (64 << 20):
            block = stream.read(1 << 16)
            if not block:
                break
            head += block
    except OSError as exc:
        raise InputError(f"input file {path!r} cannot be read: {exc}") from None
    finally:
        stream.close()
    first = next((line for line in head.split(b"\n") if line.strip()), b"")
    try:
        if not first or isinstance(json.loads(first), dict):
            return "jsonl"
    except ValueError:
        pass
    raise InputError(f"input file {path!r} is JSON but not JSON Lines (one object per line): rayinfer reads JSON in "
                     "chunks of lines; convert it (e.g. jq -c '.[]' file.json > file.jsonl) or to Parquet")


def open_input(path: str) -> tuple[pafs.FileSystem, str]:
    return filesystem(path, "input.path", InputError)


def local_file(path: str) -> str | None:
    fs, fpath = open_input(path)
    return fpath if isinstance(fs, pafs.LocalFileSystem) else None


def input_file(path: str) -> Any:
    fs, fpath = open_input(path)
    try:
        return fs.open_input_file(fpath)
    except FileNotFoundError:
        raise InputError(f"input file {path!r} disappeared") from None
    except PermissionError:
        raise InputError(f"input file {path!r} is not readable (permission denied)") from None


class Chunks:
    noun = "chunk"

    def __init__(self, path: str, source: Source, id_column: str | None = None) -> None:
        self.path, self.source, self.id_column = path, source, id_column

    def close(self) -> None:
        """Release the open file (a no-op for readers that open a file per chunk)."""

    def chunk_rows(self) -> tuple[int, ...]:
        raise NotImplementedError

    def where(self, i: int, start: int, stop: int) -> str:
        """How a message names chunk ``i`` (rows ``start``-``stop`` - 1 of the file)."""
        return f"{self.noun} {i} (rows {start}-{stop - 1})"

    def chunk(self, i: int, columns: list[str], batch_rows: int) -> Iterator[Piece]:
        raise NotImplementedError
