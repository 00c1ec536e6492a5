"""Output parts, commits, coverage (for resume and verification) and the manifest.

Rules that make output safe to read at any moment and safe to resume:
- a part is streamed into a temporary file (under ``.tmp/``; for object stores, a local temp
  file) and moved into the output folder, or uploaded whole, only when complete: a reader never
  sees a half-written part;
- a part holds a run of one work unit's rows, many actor batches, in row groups of up to
  ``ROW_GROUP_ROWS`` rows; a part ends at its unit's end or once it holds ``part_bytes``;
- a part's name is derived from its first (file, row) coordinate: parts never collide, and a
  retried unit first skips the rows its earlier attempt committed (``unit_todo``), so no row
  is ever committed twice;
- each part records the input row ranges it covers and what produced it (the job's identity,
  the input file's fingerprint) in its Parquet footer; resume reads these footers (not the ids)
  to skip covered rows, and refuses parts of another job;
- ``_manifest.json`` is written last, and only by a run that finished and whose parts were
  checked to cover every input row exactly once (``verify_coverage``).
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayinfer.errors import OutputError, RunError, SpecError
from rayinfer.inputs import InputFile, Ranges, merge_ranges, rows_to_ranges, subtract_ranges
from rayinfer.runner import ERROR_COL
from rayinfer.storage import OBJECT_STORES, filesystem, is_uri, local_path, redact, uri_for

MANIFEST = "_manifest.json"  # "_" so Parquet readers of the folder skip it, like Spark's _SUCCESS
TMP_DIR = ".tmp"
PART_PREFIX = "part-"
META_PROVENANCE = b"rayinfer"
META_COVERAGE = b"rayinfer.coverage"
ROW_GROUP_ROWS = 100_000  # DuckDB writes 122,880-row groups, Spark ~128 MiB ones: this is in between
ROW_GROUP_BYTES = 32 << 20  # uncompressed Arrow bytes buffered before a row group is written


def part_name(file: str, row: int) -> str:
    digest = hashlib.sha1(file.encode("utf-8")).hexdigest()[:12]
    return f"{PART_PREFIX}{digest}-{row:012d}.parquet"


class Store:
    """An output folder: a local path or a URI (``s3://bucket/prefix``, ``gs://...``, ``file://...``).

    Every write is atomic for readers: on file systems with rename (local, HDFS, ``file://``) a
    part is written under ``.tmp/`` and moved into place; on object stores (S3, GCS, Azure), which
    have no rename, the whole part is uploaded in one request and appears only once complete.
    Picklable as its location string, so each actor opens it with its own node's credentials.
    """

    def __init__(self, location: str) -> None:
        self.location = location if is_uri(location) else os.path.abspath(os.path.expanduser(location))
        self.fs, self.root = filesystem(location, "output.path", OutputError)
        self.object_store = self.fs.type_name in OBJECT_STORES

    def __reduce__(self) -> tuple[Any, ...]:
        return (Store, (self.location,))

    def path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def uri(self, name: str) -> str:
        return uri_for(self.path(name), self.location)

    def info(self) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.root)
        except OSError as exc:  # credentials, network, missing bucket
            raise OutputError(f"output.path {redact(self.location)!r}: cannot reach it ({exc})") from None

    def names(self) -> list[str]:
        """Names directly inside the folder (none when it does not exist)."""
        if self.info().type != pafs.FileType.Directory:
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, allow_not_found=True))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def parts(self) -> list[str]:
        return [n for n in self.names() if n.startswith(PART_PREFIX) and n.endswith(".parquet")]

    def put(self, name: str, data: bytes | pa.Buffer) -> None:
        if self.object_store:
            with self.fs.open_output_stream(self.path(name)) as f:
                f.write(data)
            return
        tmp_dir = self.path(TMP_DIR)
        self.fs.create_dir(tmp_dir, recursive=True)
        tmp = f"{tmp_dir}/{name}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        self.fs.move(tmp, self.path(name))

    def put_file(self, name: str, local_file: str) -> None:
        """Commit a finished local file as ``name``: moved into place, or uploaded whole."""
        if self.object_store:
            with open(local_file, "rb") as src, self.fs.open_output_stream(self.path(name)) as dst:
                shutil.copyfileobj(src, dst, 8 << 20)
            os.unlink(local_file)
        else:
            self.fs.move(local_file, self.path(name))

    def temp_file(self, name: str) -> str:
        """A path to write ``name`` to before it is committed: under ``.tmp/`` beside the parts on
        file systems (a rename then commits it), a local temp file for object stores."""
        if self.object_store:
            return os.path.join(tempfile.mkdtemp(prefix="rayinfer-part-"), name)
        tmp_dir = self.path(TMP_DIR)
        self.fs.create_dir(tmp_dir, recursive=True)
        return f"{tmp_dir}/{name}.{uuid.uuid4().hex}.tmp"

    def read(self, name: str) -> bytes:
        with self.fs.open_input_file(self.path(name)) as f:
            return f.read()

    def open(self, name: str) -> pa.NativeFile:
        return self.fs.open_input_file(self.path(name))

    def delete(self, name: str) -> None:
        self.fs.delete_file(self.path(name))

    def clear_tmp(self) -> None:
        if not self.object_store:
            try:
                self.fs.delete_dir(self.path(TMP_DIR))
            except (FileNotFoundError, OSError):
                pass


def list_parts(out_dir: str | Store) -> list[str]:
    """The committed part names in an output folder, sorted."""
    return _store(out_dir).parts()


def _store(out_dir: str | Path | Store) -> Store:
    return out_dir if isinstance(out_dir, Store) else Store(str(out_dir))


def prepare(out_dir: str, mode: str, check_only: bool = False) -> None:
    """Apply ``output.mode`` to the output folder: refuse, clear or keep what is there."""
    store = Store(out_dir)
    shown = redact(out_dir)
    info = store.info()
    if info.type == pafs.FileType.File:
        raise OutputError(f"output.path {shown!r} exists and is not a folder")
    existing = [n for n in store.names() if n != TMP_DIR]
    if existing and mode == "error":
        raise OutputError(
            f"output.path {shown!r} is not empty. Use output.mode: overwrite (or --set output.mode=overwrite) "
            "to replace it, or output.mode: resume to finish an interrupted run."
        )
    if existing and mode in ("overwrite", "resume"):
        foreign = [n for n in existing if not (n.startswith(PART_PREFIX) or n == MANIFEST)]
        if foreign:
            raise OutputError(
                f"output.path {shown!r} holds files rayinfer did not write ({', '.join(sorted(foreign)[:5])}); "
                "refusing to mix with them. Choose an empty or rayinfer-made folder."
            )
    if store.object_store:
        bucket = store.root.split("/", 1)[0]
        try:
            missing = store.fs.get_file_info(bucket).type == pafs.FileType.NotFound
        except OSError as exc:
            raise OutputError(f"output.path {shown!r}: cannot reach it ({exc})") from None
        if missing:
            raise OutputError(f"output.path {shown!r}: the bucket {bucket!r} does not exist (or these credentials cannot see it)")
    local = local_path(out_dir)
    if local is not None:  # can we write there at all? (remote stores: probed below, before Ray starts)
        probe_dir = _nearest_existing_parent(Path(local))
        if not os.access(probe_dir, os.W_OK):
            raise OutputError(f"output.path {shown!r} cannot be written (no write permission on {str(probe_dir)!r})")
    if check_only:
        return
    if not store.object_store:
        store.fs.create_dir(store.root, recursive=True)
    if local is None:
        probe = f"_rayinfer-probe-{uuid.uuid4().hex}"
        try:
            store.put(probe, b"rayinfer write probe")
            store.delete(probe)
        except OSError as exc:
            raise OutputError(f"output.path {shown!r} cannot be written ({exc})") from None
    if mode == "overwrite":
        for n in existing:
            store.delete(n)
    store.clear_tmp()
    if mode == "resume" and MANIFEST in existing:
        store.delete(MANIFEST)  # the run is not complete until it finishes again


def _nearest_existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


class PartWriter:
    """Streams one work unit's output rows into parts. Lives in each actor; holds at most one
    row group's output in memory (the rest is already in the part's temporary file).

    ``write`` appends a batch's output and commits the current part when it holds ``part_bytes``;
    ``close`` commits the last part. Both return the parts they committed, with their row counts.
    """

    def __init__(self, store: Store | str, schema: pa.Schema, provenance: dict[str, Any], part_bytes: int,
                 row_group_rows: int = ROW_GROUP_ROWS) -> None:
        self.store = _store(store)
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
        if part is not None and part["file"] != file:
            raise ValueError("a part holds the rows of one input file")
        numbers = rows.to_numpy()
        if (numbers[1:] <= numbers[:-1]).any() or (part is not None and numbers[0] <= part["last"]):
            raise RuntimeError(f"rows of {file!r} reached the part writer out of input order: a part's footer names its "
                               "rows by ranges, so they must come in order (this is a bug in rayinfer)")
        if part is None:
            part = self._open = self._start(file, int(numbers[0]), fingerprint)
        part["last"] = int(numbers[-1])
        part["tables"].append(table)
        part["rows"].append(rows)
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

    def _start(self, file: str, first_row: int, fingerprint: str | None) -> dict[str, Any]:
        name = part_name(file, first_row)
        tmp = self.store.temp_file(name)
        provenance = {**self.provenance, "inputs": {file: fingerprint}}
        meta = {**(self.schema.metadata or {}),
                META_PROVENANCE: json.dumps(provenance, sort_keys=True, default=str).encode()}
        part = {"file": file, "name": name, "tmp": tmp, "tables": [], "rows": [], "covered": [],
                "buffered_rows": 0, "buffered_bytes": 0, "total": 0, "last": -1}
        try:
            part["sink"] = pa.OSFile(tmp, "wb") if self.store.object_store else self.store.fs.open_output_stream(tmp)
            part["writer"] = pq.ParquetWriter(part["sink"], self.schema.with_metadata(meta))
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
        rows = pa.concat_arrays(part["rows"]) if len(part["rows"]) > 1 else part["rows"][0]
        part["covered"] = merge_ranges(part["covered"] + rows_to_ranges(rows.to_pylist()))
        part["total"] += table.num_rows
        part["tables"], part["rows"], part["buffered_rows"], part["buffered_bytes"] = [], [], 0, 0

    def _commit(self) -> tuple[str, int]:
        part = self._open
        assert part is not None
        self._flush(part)  # should anything here fail (a full disk), the part stays open for abort()
        coverage = {part["file"]: [list(r) for r in part["covered"]]}
        part["writer"].add_key_value_metadata({META_COVERAGE: json.dumps(coverage).encode()})
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
        self.rows: list[pa.Array] = []

    def write(self, file: str, table: pa.Table, rows: pa.Array, fingerprint: str | None = None) -> list[tuple[str, int]]:
        self.tables.append(table)
        self.rows.append(rows)
        return []

    def close(self) -> list[tuple[str, int]]:
        if not self.tables:
            return []
        new = pa.concat_tables(self.tables)
        rows = pa.concat_arrays(self.rows).to_pylist()
        errors = len(new.column(ERROR_COL).drop_null())
        retry = {k: self.provenance.get(k) for k in ("run_id", "options", "plugin_version", "rayinfer_version")}
        retry.update(rows=len(rows), fixed=len(rows) - errors)
        unit = self.unit
        changed = (unit["file"], unit["fingerprint"]) if unit["fingerprint"] != unit["was"] else None
        replace_rows(self.store, unit["part"], unit["file"], rows, new, self.schema, self.id_column, retry, changed)
        return [(unit["part"], len(rows))]

    def abort(self) -> None:
        self.tables, self.rows = [], []


def replace_rows(store: Store, name: str, file: str, input_rows: list[int], rows: pa.Table, schema: pa.Schema,
                 id_column: str, retry: dict[str, Any], fingerprint: tuple[str, str] | None = None) -> None:
    """Replace the rows of part ``name`` that came from input rows ``input_rows`` of ``file`` with
    ``rows`` (in that order), atomically: the new part is written beside it and moved over it
    (uploaded whole on object stores), so a reader sees the old part or the new one.

    Rows are found by their coordinates: the part's footer names the input rows it holds (its
    ranges, in order), so an input row's place in the part is its rank there. What is replaced
    is checked: each place must hold an error row, with the same id where both ids are known;
    otherwise the input no longer holds the same rows at the same places and nothing changes.
    Every other row stays as it was; the footer keeps the part's coverage and provenance, with
    ``retry`` added to its ``retries`` (and the input file's new ``fingerprint``, (file,
    size:mtime), when it changed)."""
    import numpy as np

    md = part_metadata(store, name)
    ranges = footer_coverage(md, store.uri(name)).get(file)
    held = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges or [(0, 0)]])
    wanted = np.asarray(input_rows, dtype=np.int64)
    places = np.searchsorted(held, wanted)
    if not ranges or (places >= len(held)).any() or (held[np.minimum(places, len(held) - 1)] != wanted).any():
        raise RunError(f"part {name} does not hold input rows {input_rows[:5]} of {redact(file)!r}: this is a bug in "
                       "rayinfer (please report it with the manifest)")
    with store.open(name) as f:
        old = pq.read_table(f).replace_schema_metadata(None)
    at = pa.array(places, pa.int64())
    if old.column(ERROR_COL).take(at).null_count:
        i = pc.indices_nonzero(pc.is_null(old.column(ERROR_COL).take(at)))[0].as_py()
        raise RunError(f"part {name}: input row {input_rows[i]} has no error there; retry-errors replaces only error "
                       "rows (this is a bug in rayinfer: please report it with the manifest)")
    was, now = old.column(id_column).take(at), rows.column(id_column)
    differ = pc.and_(pc.and_(pc.is_valid(was), pc.is_valid(now)), pc.not_equal(was, now))
    if pc.any(differ).as_py():
        i = pc.indices_nonzero(differ)[0].as_py()
        raise RunError(f"part {name}: input row {input_rows[i]} now has {id_column} {now[i].as_py()!r}, the part holds "
                       f"{was[i].as_py()!r} there: the input file changed its rows. retry-errors needs the same rows in the "
                       "same places (fix rows in place), or rerun the job from scratch")
    order = np.arange(old.num_rows)
    order[places] = old.num_rows + np.arange(len(places))
    merged = pa.concat_tables([old.cast(schema.remove_metadata()), rows.replace_schema_metadata(None).cast(schema.remove_metadata())])
    merged = merged.take(pa.array(order, pa.int64()))
    provenance = footer_provenance(md)
    provenance.setdefault("retries", []).append(retry)
    if fingerprint is not None:
        provenance.setdefault("inputs", {})[fingerprint[0]] = fingerprint[1]
    meta = {META_PROVENANCE: json.dumps(provenance, sort_keys=True, default=str).encode()}
    tmp = store.temp_file(name)
    try:
        with (pa.OSFile(tmp, "wb") if store.object_store else store.fs.open_output_stream(tmp)) as sink:
            writer = pq.ParquetWriter(sink, schema.remove_metadata().with_metadata(meta))
            writer.write_table(merged, row_group_size=ROW_GROUP_ROWS)
            writer.add_key_value_metadata({META_COVERAGE: md.metadata[META_COVERAGE]})
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
    store = _store(out_dir)
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
    store = _store(out_dir)
    return footer_coverage(part_metadata(store, name), store.uri(name))


def committed_coverage(out_dir: str | Store) -> tuple[dict[str, Ranges], int]:
    """Row ranges covered per input file by the committed parts, and how many rows they hold."""
    store = _store(out_dir)
    return _coverage(store, store.parts())


def _coverage(store: Store, names: Iterable[str]) -> tuple[dict[str, Ranges], int]:
    return _merged_coverage(((name, part_metadata(store, name)) for name in names), store)


def _merged_coverage(footers: Iterable[tuple[str, pq.FileMetaData]], store: Store | None = None) -> tuple[dict[str, Ranges], int]:
    """Coverage per input file, merged, and the rows covered, from parts' footers. Overlaps are
    kept in the row count, so a count above the merged ranges' size means a row is in two parts."""
    cover: dict[str, list[tuple[int, int]]] = {}
    rows = 0
    for name, md in footers:
        for f, ranges in footer_coverage(md, store.uri(name) if store else name).items():
            cover.setdefault(f, []).extend(ranges)
            rows += sum(b - a for a, b in ranges)
    return {f: merge_ranges(rs) for f, rs in cover.items()}, rows


def unit_todo(store: Store, unit: dict[str, Any]) -> dict[str, Any]:
    """``unit`` less the rows that committed parts already hold: a unit that Ray retries (its
    first actor died after committing some of its parts) must not commit those rows again. Only
    parts named inside the unit's rows are read."""
    file, ranges = unit["file"], [tuple(r) for r in unit["ranges"]]
    first, stop = ranges[0][0], ranges[-1][1]
    prefix = part_name(file, 0)[: -len("000000000000.parquet")]
    names = [n for n in store.parts() if n.startswith(prefix) and first <= int(n[len(prefix):-len(".parquet")]) < stop]
    if not names:
        return unit
    cover, _ = _coverage(store, names)
    todo = subtract_ranges(ranges, cover.get(file, []))
    return {**unit, "ranges": [list(r) for r in todo] or [[first, first]], "todo": sum(b - a for a, b in todo)}


def resume_coverage(out_dir: str | Store, identity: dict[str, Any], files: list[InputFile]) -> tuple[dict[str, Ranges], int]:
    """What a resume keeps: the committed parts' coverage and row count (committed_coverage), read
    in the same pass that refuses parts another job wrote: another task, model, adapter, options
    or output schema, or an input file changed since (size or modification time)."""
    store = _store(out_dir)
    fingerprints = {f.path: f.fingerprint for f in files}
    footers = [(name, part_metadata(store, name)) for name in store.parts()]
    for name, md in footers:
        made = footer_provenance(md)
        diff = [k for k in identity if k != "rayinfer_version" and made.get(k) != identity[k]]
        if diff:
            shown = "; ".join(f"{k}: {_short(made.get(k))} in the part, {_short(identity[k])} now" for k in diff[:3])
            raise SpecError(
                f"cannot resume into {redact(store.location)!r}: its part {name} was written by another job ({shown}). "
                "Resume with the spec that wrote it, or write to a new output.path (or output.mode: overwrite)."
            )
        for f, fp in (made.get("inputs") or {}).items():
            if f in fingerprints and fingerprints[f] != fp:
                raise SpecError(
                    f"cannot resume into {redact(store.location)!r}: input file {redact(f)!r} changed since part "
                    f"{name} was written (size:mtime {fp} then, {fingerprints[f]} now). Its rows there may not be "
                    "this file's rows: start again with output.mode: overwrite."
                )
    return _merged_coverage(footers, store)


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def verify_coverage(out_dir: str | Store, files: list[InputFile]) -> tuple[int, list[tuple[str, pq.FileMetaData]]]:
    """Check that the committed parts cover every input row exactly once (from their footers).
    Returns the output row count and each part's footer."""
    store = _store(out_dir)
    footers = [(name, part_metadata(store, name)) for name in store.parts()]
    cover, covered_rows = _merged_coverage(footers, store)
    for f in files:
        merged = cover.get(f.path, [])
        if merged != ([(0, f.num_rows)] if f.num_rows else []):
            raise RunError(
                f"output check failed: the parts in {redact(store.location)} cover rows {merged[:5]} of {f.path} "
                f"({f.num_rows} rows): parts were deleted (or the folder replaced) while the run went on, or this "
                "is a bug (please report it with the manifest). --resume redoes the rows no part holds."
            )
    if covered_rows != sum(f.num_rows for f in files):
        raise RunError(f"output check failed: the parts cover {covered_rows} input rows for {sum(f.num_rows for f in files)} "
                       "(rows twice, or rows of files no longer in the input). This is a bug; please report it with "
                       "the manifest.")
    out_rows = sum(md.num_rows for _, md in footers)
    in_rows = sum(f.num_rows for f in files)
    if out_rows != in_rows:
        raise RunError(f"output check failed: {out_rows} output rows for {in_rows} input rows")
    return out_rows, footers


def write_manifest(out_dir: str | Store, manifest: dict[str, Any]) -> str:
    store = _store(out_dir)
    store.put(MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))
    store.clear_tmp()
    return store.uri(MANIFEST)


def read_manifest(out_dir: str | Store) -> dict[str, Any]:
    store = _store(out_dir)
    try:
        return json.loads(store.read(MANIFEST).decode("utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{redact(store.location)!r} has no _manifest.json: the run did not finish") from None
