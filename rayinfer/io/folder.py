"""An output folder as a whole: its mode applied, what its parts cover (for resume and the final
check), and the manifest.

Rules that make output safe to read at any moment and safe to resume:
- a part is streamed into a temporary file (under ``.tmp/``; for object stores, a local temp
  file) and moved into the output folder, or uploaded whole, only when complete: a reader never
  sees a half-written part;
- a part holds a run of one work unit's rows, many actor batches, in row groups of up to
  ``ROW_GROUP_ROWS`` rows; a part ends at its unit's end or once it holds ``part_bytes``;
- a part's name is derived from its first (file, row) coordinate: parts never collide, and a
  retried unit first skips the rows its earlier attempt committed (``unit_todo``), so no row
  is ever committed twice; its rows come in input order, so its footer's row ranges name each;
- each part records the input row ranges it covers (per input file: a unit of small files packed
  together writes parts that hold several) and what produced it (the job's identity, the input
  files' fingerprints) in its Parquet footer; resume reads these footers (not the ids)
  to skip covered rows, and refuses parts of another job;
- ``_manifest.json`` is written last, and only by a run that finished and whose parts were
  checked to cover every input row exactly once (``verify_coverage``).
"""

from __future__ import annotations

import json
import os
import uuid
from pathlib import Path
from typing import Any, Iterable

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from rayinfer.errors import OutputError, RunError, SpecError
from rayinfer.io.location import local_path, redact
from rayinfer.io.lock import refuse_if_held
from rayinfer.io.parts import count_errors, footer_coverage, footer_provenance, part_metadata, part_name
from rayinfer.io.ranges import Ranges, merge_ranges, subtract_ranges
from rayinfer.io.scan import InputFile
from rayinfer.io.store import MANIFEST, PART_PREFIX, TMP_DIR, Store, as_store, is_lock


def prepare(out_dir: str, mode: str, check_only: bool = False) -> None:
    """Apply ``output.mode`` to the output folder: refuse, clear or keep what is there."""
    store = Store(out_dir)
    shown = redact(out_dir)
    info = store.info()
    if check_only:  # planning: a folder another run is writing is refused before Ray starts
        refuse_if_held(store)
    if info.type == pafs.FileType.File:
        raise OutputError(f"output.path {shown!r} exists and is not a folder")
    existing = [n for n in store.names() if n != TMP_DIR and not is_lock(n)]  # the lock: this run's (or refused)
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


def committed_coverage(out_dir: str | Store) -> tuple[dict[str, Ranges], int]:
    """Row ranges covered per input file by the committed parts, and how many rows they hold."""
    store = as_store(out_dir)
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
    parts named inside the unit's rows are read (a part is named by its first row, and every part
    the unit wrote starts at one of its rows)."""
    listed = store.parts()
    names = []
    for piece in unit["pieces"]:
        ranges = piece["ranges"]
        first, stop = ranges[0][0], ranges[-1][1]
        prefix = part_name(piece["file"], 0)[: -len("000000000000.parquet")]
        names += [n for n in listed if n.startswith(prefix) and first <= int(n[len(prefix):-len(".parquet")]) < stop]
    if not names:
        return unit
    cover, _ = _coverage(store, names)
    pieces = []
    for piece in unit["pieces"]:
        todo = subtract_ranges([tuple(r) for r in piece["ranges"]], cover.get(piece["file"], []))
        if todo:
            pieces.append({**piece, "ranges": [list(r) for r in todo]})
    return {**unit, "pieces": pieces, "todo": sum(b - a for p in pieces for a, b in p["ranges"])}


def resume_coverage(out_dir: str | Store, identity: dict[str, Any], files: list[InputFile]) -> tuple[dict[str, Ranges], int]:
    """What a resume keeps: the committed parts' coverage and row count (committed_coverage), read
    in the same pass that refuses parts another job wrote: another task, model, adapter, options
    or output schema, or an input file changed since (size or modification time)."""
    store = as_store(out_dir)
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
    store = as_store(out_dir)
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


def check_output(out_dir: str | Store, files: list[InputFile]) -> tuple[int, int, list[tuple[str, pq.FileMetaData]]]:
    """What a finished run (or retry) reports of its output, once ``verify_coverage`` has checked
    that every input row is there once: its rows, the rows with errors (from the footers' null
    counts) and each part's footer."""
    store = as_store(out_dir)
    rows, footers = verify_coverage(store, files)
    return rows, sum(count_errors(store, name, md) for name, md in footers), footers


def write_manifest(out_dir: str | Store, manifest: dict[str, Any]) -> str:
    store = as_store(out_dir)
    store.put(MANIFEST, (json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n").encode("utf-8"))
    store.clear_tmp()
    return store.uri(MANIFEST)


def read_manifest(out_dir: str | Store) -> dict[str, Any]:
    store = as_store(out_dir)
    try:
        return json.loads(store.read(MANIFEST).decode("utf-8"))
    except FileNotFoundError:
        raise OutputError(f"{redact(store.location)!r} has no _manifest.json: the run did not finish") from None
