"""What ``rayinfer retry-errors OUT`` runs: the job that wrote OUT (from its manifest, with the
user's overrides), checked to be the same task, model, adapter and output columns, and one
work unit per part holding error rows."""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayinfer.errors import ERROR_COL, InputError, OutputError, SpecError
from rayinfer.io.folder import read_manifest
from rayinfer.io.location import absolute, is_uri, redact
from rayinfer.io.parts import count_errors, footer_coverage, footer_provenance, part_metadata
from rayinfer.io.ranges import rows_to_ranges
from rayinfer.io.store import MANIFEST, Store
from rayinfer.plan.job import Plan, plan_job
from rayinfer.task.registry import Registry

SAME = ("task", "plugin", "model", "model_fingerprint", "adapter", "adapter_fingerprint", "output_schema")
"""What a retry must share with the run that wrote the parts (options, the plugin's version and
rayinfer's may change, and are recorded)."""


def plan_retry(out_dir: str, overrides: list[str] | tuple[str, ...] = (),
               registry: Registry | None = None) -> tuple[Plan, dict[str, Any]]:
    """The job that wrote ``out_dir`` (from its manifest), with ``overrides``; checked to be the
    same task, model, adapter and output columns. Returns it and the manifest."""
    location = absolute(out_dir)
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
    """One unit per part that holds error rows: the part, and per input file of it (with that
    file's fingerprint then and now) the input rows to run again, as ranges: a part holds its
    files' rows in order, so the error rows' places in the part name their coordinates."""
    files = {f.path: f for f in plan.files}
    units: list[dict[str, Any]] = []
    for name in store.parts():
        md = part_metadata(store, name)
        if not count_errors(store, name, md):
            continue
        coverage = footer_coverage(md, store.uri(name))
        inputs = footer_provenance(md).get("inputs") or {}
        with store.open(name) as f:
            errors = pq.read_table(f, columns=[ERROR_COL]).column(ERROR_COL)
        positions = pc.indices_nonzero(pc.is_valid(errors)).to_numpy()
        pieces, base = [], 0
        for file, ranges in coverage.items():
            numbers = np.concatenate([np.arange(a, b, dtype=np.int64) for a, b in ranges or [(0, 0)]])
            mine = positions[(positions >= base) & (positions < base + len(numbers))] - base
            base += len(numbers)
            if not len(mine):
                continue
            if file not in files:
                raise InputError(f"part {name} holds rows of input file {redact(file)!r}, which input.path no longer has")
            pieces.append({"file": file, "fingerprint": files[file].fingerprint, "was": inputs.get(file),
                           "ranges": [list(r) for r in rows_to_ranges(numbers[mine].tolist())]})
        units.append({"part": name, "pieces": pieces, "todo": len(positions)})
    units.sort(key=lambda u: -u["todo"])
    return units, sum(u["todo"] for u in units)
