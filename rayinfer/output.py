"""Output parts, commits, coverage (for resume) and the manifest.

Rules that make output safe to read at any moment and safe to resume:
- a part is written under ``.tmp/`` and committed by ``os.replace`` into the output folder,
  so a reader never sees a half-written part;
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
import shutil
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from rayinfer.errors import OutputError
from rayinfer.inputs import Ranges, merge_ranges, rows_to_ranges

MANIFEST = "_manifest.json"  # "_" so Parquet readers of the folder skip it, like Spark's _SUCCESS
TMP_DIR = ".tmp"
PART_PREFIX = "part-"
META_PROVENANCE = b"rayinfer"
META_COVERAGE = b"rayinfer.coverage"


def part_name(file: str, row: int) -> str:
    digest = hashlib.sha1(file.encode("utf-8")).hexdigest()[:12]
    return f"{PART_PREFIX}{digest}-{row:012d}.parquet"


def list_parts(out_dir: str | Path) -> list[Path]:
    d = Path(out_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith(PART_PREFIX) and p.name.endswith(".parquet"))


def prepare(out_dir: str, mode: str, check_only: bool = False) -> None:
    """Apply ``output.mode`` to the output folder: refuse, clear or keep what is there."""
    if "://" in out_dir:
        raise OutputError(
            f"output.path {out_dir!r}: writing to object stores is not supported yet (parts are committed by "
            "an atomic rename); use a local folder or a shared file system mounted on every node"
        )
    d = Path(out_dir).expanduser()
    if d.exists() and not d.is_dir():
        raise OutputError(f"output.path {out_dir!r} exists and is not a folder")
    existing = [p for p in d.iterdir() if p.name != TMP_DIR] if d.is_dir() else []
    if existing and mode == "error":
        raise OutputError(
            f"output.path {out_dir!r} is not empty. Use output.mode: overwrite (or --set output.mode=overwrite) "
            "to replace it, or output.mode: resume to finish an interrupted run."
        )
    if existing and mode in ("overwrite", "resume"):
        foreign = [p.name for p in existing if not (p.name.startswith(PART_PREFIX) or p.name == MANIFEST)]
        if foreign:
            raise OutputError(
                f"output.path {out_dir!r} holds files rayinfer did not write ({', '.join(sorted(foreign)[:5])}); "
                "refusing to mix with them. Choose an empty or rayinfer-made folder."
            )
    # can we write there at all?
    probe_dir = d if d.is_dir() else _nearest_existing_parent(d)
    if not os.access(probe_dir, os.W_OK):
        raise OutputError(f"output.path {out_dir!r} cannot be written (no write permission on {str(probe_dir)!r})")
    if check_only:
        return
    d.mkdir(parents=True, exist_ok=True)
    if mode == "overwrite":
        for p in existing:
            p.unlink()
    shutil.rmtree(d / TMP_DIR, ignore_errors=True)
    if mode == "resume":
        (d / MANIFEST).unlink(missing_ok=True)  # the run is not complete until it finishes again


def _nearest_existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


class PartWriter:
    """Writes one batch's output as a committed part. Lives in each actor."""

    def __init__(self, out_dir: str, schema: pa.Schema, provenance: dict[str, Any]) -> None:
        self.out_dir = Path(out_dir)
        self.tmp_dir = self.out_dir / TMP_DIR
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
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.tmp_dir / f"{name}.{uuid.uuid4().hex}.tmp"
        pq.write_table(table, tmp)
        os.replace(tmp, self.out_dir / name)
        return name


def part_coverage(path: Path) -> dict[str, Ranges]:
    try:
        meta = pq.read_schema(path).metadata or {}
        raw = json.loads(meta[META_COVERAGE])
    except Exception as exc:
        raise OutputError(f"{path} is not a readable rayinfer part ({exc}); delete it to resume") from None
    return {f: [tuple(r) for r in rs] for f, rs in raw.items()}


def committed_coverage(out_dir: str | Path) -> tuple[dict[str, Ranges], int]:
    """Row ranges covered per input file by the committed parts, and how many rows they hold."""
    cover: dict[str, list[tuple[int, int]]] = {}
    rows = 0
    for p in list_parts(out_dir):
        for f, ranges in part_coverage(p).items():
            cover.setdefault(f, []).extend(ranges)
            rows += sum(b - a for a, b in ranges)
    return {f: merge_ranges(rs) for f, rs in cover.items()}, rows


def write_manifest(out_dir: str | Path, manifest: dict[str, Any]) -> Path:
    d = Path(out_dir)
    tmp = d / f".{MANIFEST}.{uuid.uuid4().hex}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, d / MANIFEST)
    shutil.rmtree(d / TMP_DIR, ignore_errors=True)
    return d / MANIFEST


def read_manifest(out_dir: str | Path) -> dict[str, Any]:
    p = Path(out_dir) / MANIFEST
    if not p.is_file():
        raise OutputError(f"{out_dir!r} has no _manifest.json: the run did not finish")
    return json.loads(p.read_text(encoding="utf-8"))

