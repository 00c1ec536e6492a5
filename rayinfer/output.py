"""Output parts, commits, coverage (for resume) and the manifest.

Rules that make output safe to read at any moment and safe to resume:
- a part is written under ``.tmp/`` and moved into the output folder (on object stores, which
  have no rename, uploaded whole in one request), so a reader never sees a half-written part;
- a part's name is derived from the smallest (file, row) coordinate of the rows it holds:
  batches of one run are disjoint, so names never collide, and a retried batch rewrites the
  same name with the same rows instead of duplicating them;
- each part records the input row ranges it covers in its Parquet metadata; resume reads
  these footers (not the ids) to skip covered rows;
- ``_manifest.json`` is written last, and only by a run that finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayinfer.errors import OutputError
from rayinfer.inputs import Ranges, merge_ranges, rows_to_ranges
from rayinfer.storage import OBJECT_STORES, filesystem, is_uri, local_path, redact, uri_for

MANIFEST = "_manifest.json"  # "_" so Parquet readers of the folder skip it, like Spark's _SUCCESS
TMP_DIR = ".tmp"
PART_PREFIX = "part-"
META_PROVENANCE = b"rayinfer"
META_COVERAGE = b"rayinfer.coverage"


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
    """Writes one batch's output as a committed part. Lives in each actor."""

    def __init__(self, out_dir: str, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        self.store = Store(out_dir)
        self.schema = schema
        self.provenance = json.dumps(provenance, sort_keys=True, default=str).encode()

    def commit(self, table: pa.Table, files: list[str], rows: list[int]) -> str:
        """Write ``table`` whose i-th row came from input (files[i], rows[i]); return the part name."""
        coverage: dict[str, list[int]] = {}
        for f, r in zip(files, rows):
            coverage.setdefault(f, []).append(r)
        first_file = min(coverage)
        name = part_name(first_file, min(coverage[first_file]))
        meta = {
            META_PROVENANCE: self.provenance,
            META_COVERAGE: json.dumps({f: rows_to_ranges(rs) for f, rs in coverage.items()}).encode(),
        }
        table = table.replace_schema_metadata({**(self.schema.metadata or {}), **meta})
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.store.put(name, sink.getvalue())
        return name


def part_metadata(out_dir: str | Store, name: str) -> pq.FileMetaData:
    store = _store(out_dir)
    try:
        with store.open(name) as f:
            return pq.read_metadata(f)
    except Exception as exc:
        raise OutputError(f"{store.uri(name)} is not a readable rayinfer part ({exc}); delete it to resume") from None


def part_coverage(out_dir: str | Store, name: str) -> dict[str, Ranges]:
    store = _store(out_dir)
    try:
        with store.open(name) as f:
            meta = pq.read_schema(f).metadata or {}
        raw = json.loads(meta[META_COVERAGE])
    except Exception as exc:
        raise OutputError(f"{store.uri(name)} is not a readable rayinfer part ({exc}); delete it to resume") from None
    return {f: [tuple(r) for r in rs] for f, rs in raw.items()}


def committed_coverage(out_dir: str | Store) -> tuple[dict[str, Ranges], int]:
    """Row ranges covered per input file by the committed parts, and how many rows they hold."""
    store = _store(out_dir)
    cover: dict[str, list[tuple[int, int]]] = {}
    rows = 0
    for name in store.parts():
        for f, ranges in part_coverage(store, name).items():
            cover.setdefault(f, []).extend(ranges)
            rows += sum(b - a for a, b in ranges)
    return {f: merge_ranges(rs) for f, rs in cover.items()}, rows


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
