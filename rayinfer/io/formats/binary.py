"""Parquet and Arrow IPC inputs: their chunks are row groups and record batches, read by random
access (Arrow IPC streams, as Hugging Face ``save_to_disk`` writes them, in order)."""

from __future__ import annotations

from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from rayinfer.errors import InputError
from rayinfer.io.formats.base import Chunks, Piece, Source, input_file, local_file


def open_parquet(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(input_file(path))
    except (pa.ArrowInvalid, OSError) as exc:
        raise InputError(f"input file {path!r} is not a readable Parquet file: {exc}") from None


class ParquetChunks(Chunks):
    noun = "row group"

    def __init__(self, path: str, source: Source, id_column: str | None = None) -> None:
        super().__init__(path, source, id_column)
        self.pf = open_parquet(path)

    def close(self) -> None:
        self.pf.close()

    def chunk(self, i: int, columns: list[str], batch_rows: int) -> Iterator[Piece]:
        for rb in self.pf.iter_batches(batch_size=batch_rows, row_groups=[i], columns=columns, use_threads=False):
            yield Piece(pa.Table.from_batches([rb]))


class ArrowChunks(Chunks):
    """Arrow IPC: the file format (random access to record batches) or the stream format (read in
    order; Hugging Face datasets write it); memory-mapped where the file is local."""

    noun = "record batch"

    def __init__(self, path: str, source: Source, id_column: str | None = None) -> None:
        super().__init__(path, source, id_column)
        self._file: Any = None
        self._stream: Any = None
        self._source: Any = None
        self._next = 0
        try:
            self._file = pa.ipc.open_file(self._source_file())
        except pa.ArrowInvalid:
            self._open_stream()
        self.schema = (self._file or self._stream).schema

    def _source_file(self) -> Any:
        self.close()
        local = local_file(self.path)
        try:
            self._source = pa.memory_map(local) if local else input_file(self.path)
        except FileNotFoundError:
            raise InputError(f"input file {self.path!r} disappeared") from None
        return self._source

    def close(self) -> None:
        if self._source is not None:
            self._source.close()
            self._source = None

    def _open_stream(self) -> None:
        try:
            self._stream, self._next = pa.ipc.open_stream(self._source_file()), 0
        except pa.ArrowInvalid as exc:
            raise InputError(f"input file {self.path!r} is not a readable Arrow IPC file or stream: {exc}") from None

    def chunk_rows(self) -> tuple[int, ...]:
        if self._file is not None:
            return tuple(self._file.get_batch(i).num_rows for i in range(self._file.num_record_batches))
        rows = tuple(batch.num_rows for batch in self._stream)
        self._open_stream()
        return rows

    def _batch(self, i: int) -> pa.RecordBatch:
        if self._file is not None:
            return self._file.get_batch(i)
        if i < self._next:
            self._open_stream()
        while True:
            batch = self._stream.read_next_batch()
            self._next += 1
            if self._next - 1 == i:
                return batch

    def chunk(self, i: int, columns: list[str], batch_rows: int) -> Iterator[Piece]:
        table = pa.Table.from_batches([self._batch(i).select(columns)])
        for start in range(0, table.num_rows, batch_rows):
            yield Piece(table.slice(start, batch_rows))
