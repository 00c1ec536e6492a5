"""``rayinfer retry-errors OUT``: run again only the rows of a finished output whose ``error`` is
set (after fixing the input, raising a limit, or a transient failure), replacing them in their
parts.

The job comes from the output's manifest (its spec, with the user's ``--set`` overrides: a
raised limit is an option); it must be the same task, model, adapter and output columns. Each
part holding error rows is one unit of work: an actor reads those rows from the input again,
runs them through the same unit loop as a run (rayinfer/run/unit.py), and replaces them in the
part atomically (``rayinfer.io.parts.replace_rows``, by their coordinates); rows that fail
again keep their new error. Every other row, and every part without errors, stays byte for byte
as it was. The manifest keeps the first run and gains a ``retries`` entry per retry; each
rewritten part's footer records the retry too.
"""

from __future__ import annotations

import threading
import time
from datetime import datetime, timezone
from typing import Any, Callable

from rayinfer.io.folder import check_output, write_manifest
from rayinfer.io.lock import OutputLock
from rayinfer.io.store import Store
from rayinfer.plan.job import Plan
from rayinfer.plan.retry import error_units, plan_retry
from rayinfer.run.driver import new_run_id, run_units
from rayinfer.run.progress import RunTotals
from rayinfer.task.registry import Registry


def retry_errors(out_dir: str, overrides: list[str] | tuple[str, ...] = (), *, address: str | None = None,
                 progress: bool | Callable[[dict[str, Any]], None] = False, stop: threading.Event | None = None,
                 registry: Registry | None = None) -> dict[str, Any]:
    """Run the error rows of a finished output again; returns the updated manifest."""
    plan, manifest = plan_retry(out_dir, overrides, registry)
    location = plan.spec.output.path
    store = Store(location)
    run_id = new_run_id()
    with OutputLock.acquire(store, run_id, "retry-errors") as lock:
        return _retry(plan, manifest, store, run_id, lock, overrides, address, progress, stop)


def _retry(plan: Plan, manifest: dict[str, Any], store: Store, run_id: str, lock: OutputLock,
           overrides: list[str] | tuple[str, ...], address: str | None,
           progress: bool | Callable[[dict[str, Any]], None], stop: threading.Event | None) -> dict[str, Any]:
    location = plan.spec.output.path
    started_at, t0 = datetime.now(timezone.utc), time.perf_counter()
    units, rows = error_units(store, plan)
    totals = RunTotals(todo=rows)
    if rows:
        run_units(plan, address, location, run_id, lambda pool: units, totals, progress, stop,
                  "a rerun of retry-errors does the other")
    out_rows, errors, _ = check_output(store, plan.files)
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
        "worker_memory_kills": totals.memory_kills,
    })
    manifest["errors"] = errors
    manifest["rows"] = out_rows
    lock.check()
    write_manifest(store, manifest)
    return manifest
