"""Input formats: for each, a file's schema and its rows in chunks, the unit of random access.

A chunk is a Parquet row group, an Arrow IPC record batch (IPC files, Feather v2, and the
stream files of a Hugging Face ``save_to_disk`` folder), or a block of ``TEXT_CHUNK_ROWS``
records of a JSON Lines or CSV file. Text formats have no random access of their own: when the
job is planned, one pass over each file finds the byte offset where each block starts (and, for
CSV, where quoted values span lines), so that a work unit, a resume or a retry reads only the
blocks that hold its rows. A compressed text file (``.gz``, ``.zst``, ``.bz2``, ``.xz``,
``.lz4``) is indexed the same way through its codec: its offsets are into the decompressed
stream, which a reader decompresses forward up to the blocks it needs. A JSON line or CSV
record that does not parse, or whose values do not fit the column types, is a *malformed* row:
it becomes an error row naming file and line, and the rest of its block goes on.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pyarrow as pa

from rayinfer.errors import InputError
from rayinfer.io.formats.base import Chunks, Source, compression_of
from rayinfer.io.formats.binary import ArrowChunks, ParquetChunks, open_parquet
from rayinfer.io.formats.text import TextChunks, index_text, infer_schema


def describe(path: str, fmt: str, column_types: dict[str, pa.DataType], delimiter: str | None,
             text_schema: pa.Schema | None) -> tuple[tuple[int, ...], pa.Schema, Source]:
    """(rows per chunk, schema, source) of one input file. ``text_schema``: the schema a text
    file's rows are parsed into, inferred from the first text file when None."""
    compression = compression_of(path)
    if path.lower().endswith(".zip"):
        raise InputError(f"input file {path!r} is a zip archive, not a stream of records: unzip it (gzip, zstd, bz2, "
                         "xz and lz4 files are read as they are)")
    if compression is not None and fmt not in ("jsonl", "csv"):
        raise InputError(f"input file {path!r} is a {fmt} file compressed as a whole ({compression}): rayinfer reads "
                         f"{fmt} files by random access; decompress it ({fmt} compresses inside, by column)")
    if fmt == "parquet":
        pf = open_parquet(path)
        md = pf.metadata
        return tuple(md.row_group(i).num_rows for i in range(md.num_row_groups)), pf.schema_arrow, Source("parquet")
    if fmt == "arrow":
        reader = ArrowChunks(path, Source("arrow"))
        try:
            return reader.chunk_rows(), reader.schema, Source("arrow")
        finally:
            reader.close()
    is_csv = fmt == "csv"
    stem = path[: -len(os.path.splitext(path)[1])] if compression else path
    delimiter = delimiter or ("\t" if stem.lower().endswith(".tsv") else ",")
    header, offsets, lines, counts = index_text(path, is_csv, compression)
    source = Source(fmt, None, tuple(offsets), tuple(lines), header, delimiter, compression)
    if not counts and text_schema is None:  # no records to type the columns by: the next file will
        return (), pa.schema([]), source
    schema = text_schema or infer_schema(path, source, column_types)
    return tuple(counts), schema, replace(source, schema=schema)


def open_chunks(path: str, source: Source, id_column: str | None = None) -> "Chunks":
    """A reader of one file's chunks (close it when done). ``id_column``: the column whose value a
    malformed text record keeps where it can be recovered safely (see ``TextChunks``)."""
    readers = {"parquet": ParquetChunks, "arrow": ArrowChunks, "jsonl": TextChunks, "csv": TextChunks}
    return readers[source.format](path, source, id_column)
