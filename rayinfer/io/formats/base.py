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
    ".jsonl": "jsonl", ".ndjson": "jsonl",
    ".csv": "csv", ".tsv": "csv",
}


@dataclass(frozen=True)
class Source:
    """What a reader needs beyond the path to read one input file's chunks."""

    format: str
    schema: pa.Schema | None = None  # text formats: the columns and types every row is parsed into
    offsets: tuple[int, ...] = ()  # text formats: where each chunk's first record starts, then the end
    lines: tuple[int, ...] = ()  # text formats: the line number (1-based) each chunk starts at
    header: bytes = b""  # CSV: the header record, put before each block that is parsed
    delimiter: str = ","


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


def format_of(path: str, given: str) -> str | None:
    """The format of a file: ``given`` unless it is auto, else its extension's (None: not an input file)."""
    if given != "auto":
        return given
    return EXTENSIONS.get(os.path.splitext(path)[1].lower())


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
