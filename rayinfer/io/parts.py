"""Output parts: streamed by ``PartWriter``, committed atomically, each recording in its Parquet
footer the input rows it covers (its coverage) and what produced it (its provenance); a retry's
``RowReplacer`` swaps a part's error rows for their new output.

A part holds a run of one work unit's rows (of one file, or of several small files one after the
other), in input order, in row groups of up to ``ROW_GROUP_ROWS`` rows; its name is derived
from its first (file, row) coordinate, so parts never collide. The footer's keys: coverage
(``rayinfer.coverage``: input file -> row ranges, in the order the part holds them) and
provenance (``rayinfer``: the job's identity, the run, each input file's fingerprint)."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayinfer.errors import ERROR_COL, OutputError, RunError
from rayinfer.io.location import redact
from rayinfer.io.ranges import Ranges, merge_ranges, rows_to_ranges
from rayinfer.io.store import PART_PREFIX, Store, as_store

META_PROVENANCE = b"rayinfer"


META_COVERAGE = b"rayinfer.coverage"


ROW_GROUP_ROWS = 100_000  # DuckDB writes 122,880-row groups, Spark ~128 MiB ones: this is in between


ROW_GROUP_BYTES = 32 << 20  # uncompressed Arrow bytes buffered before a row group is written


def part_name(file: str, row: int) -> str:
    digest = hashlib.sha1(file.encode("utf-8")).hexdigest()[:12]
    return f"{PART_PREFIX}{digest}-{row:012d}.parquet"


class PartWriter:
    """Streams one work unit's output rows into parts. Lives in each actor; holds at most one
    row group's output in memory (the rest is already in the part's temporary file).

    ``write`` appends a batch's output and commits the current part when it holds ``part_bytes``;
    ``close`` commits the last part. Both return the parts they committed, with their row counts.
    A part may hold the rows of several input files (a unit of small files packed together): they
    come file after file, each file's rows in input order, and its footer names them per file.
    """

    def __init__(self, store: Store | str, schema: pa.Schema, provenance: dict[str, Any], part_bytes: int,
                 row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.store = as_store(store)
        self.part_bytes = part_bytes
        self.row_group_rows = row_group_rows
        self.provenance = provenance
        self.schema = schema
        self._open: dict[str, Any] | None = None

    def write(self, file: str, table: pa.Table, rows: pa.Array, fingerprint: str | None = None) -> list[tuple[str, int]]:
        """Append ``table``, whose i-th row came from input row ``rows[i]`` of ``file`` (whose
        ``fingerprint`` the part records, so a resume can tell that the file changed)."""
        if table.num_rows == 0:
            return []
        part = self._open
        numbers = rows.to_numpy()
        if part is not None and file != part["file"] and file in part["inputs"]:
            raise RuntimeError(f"rows of {file!r} reached the part writer after another file's: a part holds its files "
                               "one after the other (this is a bug in rayinfer)")
        same_file = part is not None and file == part["file"]
        if (numbers[1:] <= numbers[:-1]).any() or (same_file and numbers[0] <= part["last"]):  # type: ignore[index]
            raise RuntimeError(f"rows of {file!r} reached the part writer out of input order: a part's footer names its "
                               "rows by ranges, so they must come in order (this is a bug in rayinfer)")
        if part is None:
            part = self._open = self._start(file, int(numbers[0]))
        part["file"], part["last"] = file, int(numbers[-1])
        part["inputs"][file] = fingerprint
        part["tables"].append(table)
        part["rows"].append((file, rows))
        part["buffered_rows"] += table.num_rows
        part["buffered_bytes"] += table.nbytes
        if part["buffered_rows"] >= self.row_group_rows or part["buffered_bytes"] >= min(ROW_GROUP_BYTES, self.part_bytes):
            self._flush(part)
            if part["sink"].tell() >= self.part_bytes:
                return [self._commit()]
        return []

    def close(self) -> list[tuple[str, int]]:
        return [self._commit()] if self._open is not None else []

    def abort(self) -> None:
        """Drop the open part (its rows were not committed: a resume or retry redoes them)."""
        part, self._open = self._open, None
        if part is not None:
            self._discard(part["tmp"], part["writer"], part["sink"])

    def _discard(self, tmp: str, *open_files: Any) -> None:
        """Close what is open and delete the temporary file, even when closing fails (a full disk
        fails the close too)."""
        for f in open_files:
            try:
                f.close()
            except OSError:
                pass
        try:
            if self.store.object_store:
                os.unlink(tmp)
            else:
                self.store.fs.delete_file(tmp)
        except OSError:
            pass

    def _start(self, file: str, first_row: int) -> dict[str, Any]:
        name = part_name(file, first_row)
        tmp = self.store.temp_file(name)
        part = {"file": file, "name": name, "tmp": tmp, "tables": [], "rows": [], "covered": {}, "inputs": {},
                "buffered_rows": 0, "buffered_bytes": 0, "total": 0, "last": -1}
        try:
            part["sink"] = pa.OSFile(tmp, "wb") if self.store.object_store else self.store.fs.open_output_stream(tmp)
            part["writer"] = pq.ParquetWriter(part["sink"], self.schema)
        except BaseException:  # a full disk fails here already: leave no temporary file behind
            self._discard(tmp, *[part[k] for k in ("sink",) if k in part])
            raise
        return part

    def _flush(self, part: dict[str, Any]) -> None:
        if not part["tables"]:
            return
        table = pa.concat_tables(part["tables"]) if len(part["tables"]) > 1 else part["tables"][0]
        part["writer"].write_table(table.replace_schema_metadata(None).cast(self.schema.remove_metadata()),
                                   row_group_size=self.row_group_rows)
        for file, rows in part["rows"]:
            part["covered"][file] = merge_ranges(part["covered"].get(file, []) + rows_to_ranges(rows.to_pylist()))
        part["total"] += table.num_rows
        part["tables"], part["rows"], part["buffered_rows"], part["buffered_bytes"] = [], [], 0, 0

    def _commit(self) -> tuple[str, int]:
        part = self._open
        assert part is not None
        self._flush(part)  # should anything here fail (a full disk), the part stays open for abort()
        coverage = {f: [list(r) for r in ranges] for f, ranges in part["covered"].items()}
        provenance = {**self.provenance, "inputs": part["inputs"]}
        part["writer"].add_key_value_metadata({
            META_PROVENANCE: json.dumps(provenance, sort_keys=True, default=str).encode(),
            META_COVERAGE: json.dumps(coverage).encode(),
        })
        part["writer"].close()
        part["sink"].close()
        self.store.put_file(part["name"], part["tmp"])
        self._open = None
        return part["name"], part["total"]


class RowReplacer:
    """A retry's sink (the unit loop's counterpart of PartWriter): collects the new output of a
    part's error rows and, when the unit ends, replaces them in the part (``replace_rows``)."""

    def __init__(self, store: Store, unit: dict[str, Any], schema: pa.Schema, id_column: str,
                 provenance: dict[str, Any]) -> None:
        self.store, self.unit, self.schema, self.id_column = store, unit, schema, id_column
        self.provenance = provenance
        self.tables: list[pa.Table] = []
        self.rows: list[tuple[str, pa.Array]] = []

    def write(self, file: str, table: pa.Table, rows: pa.Array, fingerprint: str | None = None) -> list[tuple[str, int]]:
        self.tables.append(table)
        self.rows.append((file, rows))
        return []

    def close(self) -> list[tuple[str, int]]:
        if not self.tables:
            return []
        new = pa.concat_tables(self.tables)
        rows = [(file, r) for file, batch in self.rows for r in batch.to_pylist()]
        errors = len(new.column(ERROR_COL).drop_null())
        retry = {k: self.provenance.get(k) for k in ("run_id", "options", "plugin_version", "rayinfer_version")}
        retry.update(rows=len(rows), fixed=len(rows) - errors)
        changed = {p["file"]: p["fingerprint"] for p in self.unit["pieces"] if p["fingerprint"] != p.get("was")}
        replace_rows(self.store, self.unit["part"], rows, new, self.schema, self.id_column, retry, changed)
        return [(self.unit["part"], len(rows))]

    def abort(self) -> None:
        self.tables, self.rows = [], []


def part_places(coverage: dict[str, Ranges], wanted: list[tuple[str, int]]) -> Any:
    """The places in a part of input rows ``wanted`` ((file, row) pairs), from its footer's
    ``coverage``: a part holds its files one after the other (in the coverage's order), each
    file's rows in input order, so an input row's place is its rank there. None where the part
    does not hold them all."""
    import numpy as np

    base, held = 0, {}
    for file, ranges in coverage.items():
        rows = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges or [(0, 0)]])
        held[file] = (base, rows)
        base += len(rows)
    places = np.empty(len(wanted), dtype=np.int64)
    by_file: dict[str, list[int]] = {}
    for i, (file, _) in enumerate(wanted):
        by_file.setdefault(file, []).append(i)
    for file, at in by_file.items():
        if file not in held:
            return None
        start, rows = held[file]
        want = np.asarray([wanted[i][1] for i in at], dtype=np.int64)
        k = np.searchsorted(rows, want)
        if (k >= len(rows)).any() or (rows[np.minimum(k, len(rows) - 1)] != want).any():
            return None
        places[at] = start + k
    return places


def replace_rows(store: Store, name: str, input_rows: list[tuple[str, int]], rows: pa.Table, schema: pa.Schema,
                 id_column: str, retry: dict[str, Any], fingerprints: dict[str, str] | None = None) -> None:
    """Replace the rows of part ``name`` that came from ``input_rows`` ((file, row) pairs) with
    ``rows`` (in that order), atomically: the new part is written beside it and moved over it
    (uploaded whole on object stores), so a reader sees the old part or the new one.

    Rows are found by their coordinates: the part's footer names the input rows it holds (its
    ranges per file, in order), so an input row's place in the part is its rank there. What is
    replaced is checked: each place must hold an error row, with the same id where both ids are
    known; otherwise the input no longer holds the same rows at the same places and nothing
    changes. Every other row stays as it was; the footer keeps the part's coverage and
    provenance, with ``retry`` added to its ``retries`` (and the new ``fingerprints``, file ->
    size:mtime, of input files that changed)."""
    import numpy as np

    md = part_metadata(store, name)
    places = part_places(footer_coverage(md, store.uri(name)), input_rows)
    if places is None:
        raise RunError(f"part {name} does not hold input rows {[r for _, r in input_rows[:5]]} of "
                       f"{redact(input_rows[0][0])!r}: this is a bug in rayinfer (please report it with the manifest)")
    with store.open(name) as f:
        old = pq.read_table(f).replace_schema_metadata(None)
    at = pa.array(places, pa.int64())
    if old.column(ERROR_COL).take(at).null_count:
        i = pc.indices_nonzero(pc.is_null(old.column(ERROR_COL).take(at)))[0].as_py()
        raise RunError(f"part {name}: input row {input_rows[i][1]} has no error there; retry-errors replaces only error "
                       "rows (this is a bug in rayinfer: please report it with the manifest)")
    was, now = old.column(id_column).take(at), rows.column(id_column)
    differ = pc.and_(pc.and_(pc.is_valid(was), pc.is_valid(now)), pc.not_equal(was, now))
    if pc.any(differ).as_py():
        i = pc.indices_nonzero(differ)[0].as_py()
        raise RunError(f"part {name}: input row {input_rows[i][1]} of {redact(input_rows[i][0])!r} now has {id_column} "
                       f"{now[i].as_py()!r}, the part holds {was[i].as_py()!r} there: the input file changed its rows. "
                       "retry-errors needs the same rows in the same places (fix rows in place), or rerun the job "
                       "from scratch")
    order = np.arange(old.num_rows)
    order[places] = old.num_rows + np.arange(len(places))
    merged = pa.concat_tables([old.cast(schema.remove_metadata()), rows.replace_schema_metadata(None).cast(schema.remove_metadata())])
    merged = merged.take(pa.array(order, pa.int64()))
    provenance = footer_provenance(md)
    provenance.setdefault("retries", []).append(retry)
    for file, fingerprint in (fingerprints or {}).items():
        provenance.setdefault("inputs", {})[file] = fingerprint
    tmp = store.temp_file(name)
    try:
        with (pa.OSFile(tmp, "wb") if store.object_store else store.fs.open_output_stream(tmp)) as sink:
            writer = pq.ParquetWriter(sink, schema)
            writer.write_table(merged, row_group_size=ROW_GROUP_ROWS)
            writer.add_key_value_metadata({META_PROVENANCE: json.dumps(provenance, sort_keys=True, default=str).encode(),
                                           META_COVERAGE: md.metadata[META_COVERAGE]})
            writer.close()
        store.put_file(name, tmp)
    except BaseException:
        try:
            os.unlink(tmp) if store.object_store else store.fs.delete_file(tmp)
        except OSError:
            pass
        raise


def count_errors(store: Store, name: str, md: pq.FileMetaData, column: str = ERROR_COL) -> int:
    """Rows of a part with an error, from the Parquet footer's null counts (no data read)."""
    leaf = next(j for j in range(md.num_columns) if md.row_group(0).column(j).path_in_schema == column) if md.num_row_groups else None
    count = 0
    for rg in range(md.num_row_groups):
        stats = md.row_group(rg).column(leaf).statistics
        if stats is None or not stats.has_null_count:  # a writer without statistics: read the column
            with store.open(name) as f:
                return len(pq.read_table(f, columns=[column]).column(column).drop_null())
        count += md.row_group(rg).num_rows - stats.null_count
    return count


def part_metadata(out_dir: str | Store, name: str) -> pq.FileMetaData:
    """A part's Parquet footer: row counts, statistics, and rayinfer's keys (coverage, provenance)."""
    store = as_store(out_dir)
    try:
        with store.open(name) as f:
            return pq.read_metadata(f)
    except Exception as exc:
        raise OutputError(f"{store.uri(name)} is not a readable rayinfer part ({exc}); delete it to resume") from None


def footer_coverage(md: pq.FileMetaData, where: str = "part") -> dict[str, Ranges]:
    try:
        raw = json.loads((md.metadata or {})[META_COVERAGE])
    except Exception as exc:
        raise OutputError(f"{where} is not a readable rayinfer part (no coverage: {exc}); delete it to resume") from None
    return {f: [tuple(r) for r in rs] for f, rs in raw.items()}


def footer_provenance(md: pq.FileMetaData) -> dict[str, Any]:
    raw = (md.metadata or {}).get(META_PROVENANCE)
    return json.loads(raw) if raw else {}


def part_coverage(out_dir: str | Store, name: str) -> dict[str, Ranges]:
    store = as_store(out_dir)
    return footer_coverage(part_metadata(store, name), store.uri(name))
