"""``rayinfer retry-errors OUT``: run again only the rows of a finished output whose ``error`` is
set (after fixing the input, raising a limit, or a transient failure), replacing them in their
parts.

The job comes from the output's manifest (its spec, with the user's ``--set`` overrides: a
raised limit is an option); it must be the same task, model, adapter and output columns. Each
part holding error rows is one unit of work: an actor reads those rows from the input again,
runs them, and replaces them in the part atomically (``output.replace_rows``); rows that fail
again keep their new error. Every other row, and every part without errors, stays byte for byte
as it was. The manifest keeps the first run and gains a ``retries`` entry per retry; each
rewritten part's footer records the retry too.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Callable

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayinfer.errors import InputError, OutputError, SpecError
from rayinfer.inputs import rows_to_ranges
from rayinfer.output import (MANIFEST, Store, count_errors, footer_coverage, footer_provenance, part_metadata,
                             read_manifest, verify_coverage, write_manifest)
from rayinfer.plan import Plan, plan_job
from rayinfer.plugins import Registry
from rayinfer.runner import ERROR_COL
from rayinfer.storage import is_uri, redact

SAME = ("task", "plugin", "model", "model_fingerprint", "adapter", "adapter_fingerprint", "output_schema")
"""What a retry must share with the run that wrote the parts (options, the plugin's version and
rayinfer's may change, and are recorded)."""


def plan_retry(out_dir: str, overrides: list[str] | tuple[str, ...] = (),
               registry: Registry | None = None) -> tuple[Plan, dict[str, Any]]:
    """The job that wrote ``out_dir`` (from its manifest), with ``overrides``; checked to be the
    same task, model, adapter and output columns. Returns it and the manifest."""
    location = out_dir if is_uri(out_dir) else os.path.abspath(os.path.expanduser(out_dir))
    store = Store(location)
    if store.info().type.name == "NotFound":
        raise OutputError(f"{redact(location)!r} does not exist")
    try:
        manifest = read_manifest(store)
    except OutputError:
        raise OutputError(f"{redact(location)!r} has no {MANIFEST}: only a finished run's errors can be retried. "
                          "Finish it first: rayinfer run JOB --resume") from None
    spec = manifest["spec"]
    spec["output"] = {**spec["output"], "path": location, "mode": "resume"}
    resolved = manifest["input"].get("resolved")
    if resolved and not is_uri(spec["input"]["path"]) and not os.path.isabs(os.path.expanduser(spec["input"]["path"])):
        spec["input"]["path"] = resolved  # the run's relative input.path, from wherever this runs
    plan = plan_job(spec, list(overrides) + ["output.mode=resume"], registry=registry)
    identity, then = plan.identity(), manifest.get("identity") or {}
    diff = [k for k in SAME if then.get(k) != identity[k]]
    if diff:
        raise SpecError(f"cannot retry the errors of {redact(location)!r} with another job: "
                        + "; ".join(f"{k} was {then.get(k)!r}, now {identity[k]!r}" for k in diff[:3]))
    return plan, manifest


def error_units(store: Store, plan: Plan) -> tuple[list[dict[str, Any]], int]:
    """One unit per part that holds error rows: the part, its input file (and that file's
    fingerprint then and now) and the input rows to run again, as ranges: a part holds its rows
    in input order, so the error rows' places in the part name their coordinates."""
    files = {f.path: f for f in plan.files}
    units: list[dict[str, Any]] = []
    for name in store.parts():
        md = part_metadata(store, name)
        if not count_errors(store, name, md):
            continue
        ((file, ranges),) = footer_coverage(md, store.uri(name)).items()
        if file not in files:
            raise InputError(f"part {name} holds rows of input file {redact(file)!r}, which input.path no longer has")
        with store.open(name) as f:
            errors = pq.read_table(f, columns=[ERROR_COL]).column(ERROR_COL)
        positions = pc.indices_nonzero(pc.is_valid(errors)).to_numpy()
        numbers = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges])
        rows = rows_to_ranges(numbers[positions].tolist())
        units.append({
            "part": name, "file": file, "fingerprint": files[file].fingerprint,
            "was": (footer_provenance(md).get("inputs") or {}).get(file),
            "ranges": [list(r) for r in rows], "todo": len(positions),
        })
    units.sort(key=lambda u: -u["todo"])
    return units, sum(u["todo"] for u in units)


def retry_errors(out_dir: str, overrides: list[str] | tuple[str, ...] = (), *, address: str | None = None,
                 progress: bool | Callable[[dict[str, Any]], None] = False, stop: threading.Event | None = None,
                 registry: Registry | None = None) -> dict[str, Any]:
    """Run the error rows of a finished output again; returns the updated manifest."""
    from rayinfer.pipeline import run_units
    from rayinfer.progress import RunTotals

    plan, manifest = plan_retry(out_dir, overrides, registry)
    location = plan.spec.output.path
    store = Store(location)
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
    started_at, t0 = datetime.now(timezone.utc), time.perf_counter()
    units, rows = error_units(store, plan)
    totals = RunTotals(todo=rows)
    if rows:
        run_units(plan, address, location, run_id, lambda pool: units, totals, progress, stop,
                  "a rerun of retry-errors does the other")
    out_rows, footers = verify_coverage(store, plan.files)
    errors = sum(count_errors(store, name, md) for name, md in footers)
    then = manifest.get("identity") or {}
    manifest.setdefault("retries", []).append({
        "run_id": run_id,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "duration_s": round(time.perf_counter() - t0, 3),
        "rows_retried": rows,
        "rows_fixed": rows - totals.errors,
        "errors_by_kind": dict(totals.error_kinds),
        "parts_rewritten": len(units),
        "overrides": list(overrides),
        "changed": {k: v for k, v in plan.identity().items() if then.get(k) != v},
        "worker_deaths": totals.worker_deaths,
    })
    manifest["errors"] = errors
    manifest["rows"] = out_rows
    write_manifest(store, manifest)
    return manifest
