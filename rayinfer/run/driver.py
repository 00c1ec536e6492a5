"""The driver of a run: resume or clear the output, size the pool, run the units, gather the
actors' reports, check the output, write the manifest.

    plan --make_units--> units --(cluster.build_dataset: map_batches over TaskActor)--> WorkReports
         --iter_batches here--> RunTotals -> progress, error budget --finish--> manifest

Each actor reads its own units (a unit is a file and row ranges of it): rows never travel
through Ray's object store and only small reports come back. A small Coordinator actor per run
(rayinfer/run/coordinator.py) carries what the actors share: the batches in flight when a
worker died (to isolate a row that kills its worker) and the stop flag (Ctrl-C, SIGTERM: actors
commit the rows they hold and take no new unit). ``rayinfer retry-errors`` (rayinfer/run/retry.py)
runs through the same ``run_units``, with a unit per part that holds error rows.
"""

from __future__ import annotations

import logging
import platform
import threading
import time
import uuid
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable

from rayinfer.errors import RayInferError, RunFailed, Stopped
from rayinfer.io.folder import check_output, committed_coverage, prepare, resume_coverage, write_manifest
from rayinfer.io.location import absolute
from rayinfer.io.lock import OutputLock
from rayinfer.io.ranges import covered_count
from rayinfer.io.store import Store
from rayinfer.plan.job import Plan
from rayinfer.plan.work import make_units, unit_rows
from rayinfer.run.admission import (check_gpu_memory, check_paths_visible, check_resources, gpu_choice, memory_hint,
                                    placed, pool_size, probe_gpu)
from rayinfer.run.cluster import build_dataset, data_context, init_ray, start_coordinator
from rayinfer.run.failures import PoolLost, reports, run_failure
from rayinfer.run.progress import RunTotals, TerminalProgress
from rayinfer.run.watchers import DeathWatcher, LoadWatcher, NodeWatcher, StopWatcher, wait_for_node_death
from rayinfer.version import __version__

POOL_RESTARTS = 3  # times a run goes on with a new pool after losing workers Ray could not bring back

log = logging.getLogger("rayinfer")


ERROR_RATE_MIN_ROWS = 1000  # runtime.max_error_rate is judged once this many rows are done (or all)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "rayinfer": __version__}
    for pkg in ("ray", "torch", "transformers", "peft", "pyarrow", "pluggy", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def new_run_id() -> str:
    """A run's id: when it started (UTC), then random, so that ids sort by time and never clash."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]


def execute(plan: Plan, address: str | None = None,
            progress: bool | Callable[[dict[str, Any]], None] = False,
            stop: threading.Event | None = None) -> dict[str, Any]:
    """Run a planned job and return its manifest (also written to ``output.path``).

    Setting ``stop`` (from a signal handler or another thread) stops the run cleanly: no new
    unit starts, the actors commit the rows they hold (for up to ``runtime.stop_timeout_s``, then
    the main thread is interrupted), and ``Stopped`` is raised; a resume goes on from there."""
    out_dir = absolute(plan.spec.output.path)
    run_id = new_run_id()
    with OutputLock.acquire(Store(out_dir), run_id, "run") as lock:  # before anything in the folder changes
        return _execute(plan, out_dir, run_id, lock, address, progress, stop)


def _execute(plan: Plan, out_dir: str, run_id: str, lock: OutputLock, address: str | None,
             progress: bool | Callable[[dict[str, Any]], None], stop: threading.Event | None) -> dict[str, Any]:
    spec = plan.spec
    started_at = datetime.now(timezone.utc)
    t0 = time.perf_counter()

    for note in plan.warnings:
        log.warning("rayinfer: note: %s", note)
    coverage: dict[str, list[tuple[int, int]]] = {}
    resumed_rows = 0
    if spec.output.mode == "resume":  # before prepare() changes anything: refuses another job's parts
        coverage, resumed_rows = resume_coverage(out_dir, plan.identity(), plan.files)
    prepare(out_dir, spec.output.mode)
    todo = sum(f.num_rows - covered_count(coverage.get(f.path, []), 0, f.num_rows) for f in plan.files)

    totals = RunTotals(todo=todo)
    left, restarts = todo, 0
    while left:
        def units(pool: tuple[int, int]) -> list[dict[str, Any]]:
            found = make_units(plan.files, coverage, unit_rows(left, pool[1], spec.output.part_rows, plan.task_cls.decodes))
            return sorted(found, key=lambda u: -u["todo"])  # largest first: small ones (file tails) fill in at the end

        try:
            run_units(plan, address, out_dir, run_id, units, totals, progress, stop, "a resume does the other",
                      after_loss=restarts > 0)
            break
        except PoolLost as exc:  # a node gone mid-unit: a new pool goes on from the committed parts
            restarts += 1
            if restarts > POOL_RESTARTS or (stop is not None and stop.is_set()):
                raise RunFailed(f"{exc} (after {restarts - 1} restart(s) of the pool)") from None
            log.warning("rayinfer: %s; going on from the committed parts with a new pool (restart %d of at most %d)",
                        exc.reason, restarts, POOL_RESTARTS)
            wait_for_node_death(exc.nodes)
            coverage, _ = committed_coverage(out_dir)
            left = sum(f.num_rows - covered_count(coverage.get(f.path, []), 0, f.num_rows) for f in plan.files)
            totals.rows = totals.committed_rows  # rows done but not committed are done again
            totals.worker_deaths += 1
    lock.check()
    return finish(plan, out_dir, run_id, started_at, time.perf_counter() - t0, totals, resumed_rows)


def run_units(plan: Plan, address: str | None, out_dir: str, run_id: str,
              units: Callable[[tuple[int, int]], list[dict[str, Any]]], totals: RunTotals,
              progress: bool | Callable[[dict[str, Any]], None], stop: threading.Event | None, rest: str,
              after_loss: bool = False) -> None:
    """Start (or join) Ray, size the pool, and run the work ``units(pool)`` on it, adding every
    actor report to ``totals``. Failures come out as one-line RayInferErrors; a stop as Stopped
    (``rest``: who does the rows left, e.g. "a resume does the other"). ``after_loss``: the pool
    starts from one actor (and grows to its max as they fit), as a lost node may still be listed
    alive for a while and its resources with it."""
    import ray

    local = init_ray(address)
    cluster = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    asked = plan.spec.runtime
    plan = placed(plan, [n["Resources"] for n in alive])
    rt = plan.spec.runtime
    choice = gpu_choice(asked, rt.num_gpus or 0.0, [n["Resources"] for n in alive])
    if choice and not after_loss:
        log.warning("rayinfer: note: %s", choice)
    need = plan.memory_need(rt.num_gpus)
    if need is not None and not after_loss:
        log.warning("rayinfer: note: %s", need.describe())
    pool = pool_size(plan, cluster, can_grow=not local)
    if after_loss:
        pool = (1, pool[1])
    work = units(pool)
    pool = (max(1, min(pool[0], len(work))), max(1, min(pool[1], len(work))))  # no actor loads a model for no unit
    check_resources(plan, cluster, [n["Resources"] for n in alive], pool[0], can_grow=not local)
    if not after_loss:
        check_gpu_memory(plan, probe_gpu(plan))
    check_paths_visible(plan, out_dir)
    channel = TerminalProgress() if progress is True else (progress or None)
    coordinator = start_coordinator()
    watcher = StopWatcher(stop, coordinator, rt.stop_timeout_s)
    last, lock = 0.0, threading.Lock()
    try:
        with (data_context(rt.actor_start_timeout_s), watcher, NodeWatcher(coordinator),
              LoadWatcher(channel, coordinator, pool[0], totals, lock),
              DeathWatcher(coordinator, totals, memory_hint(plan))):
            for report in reports(build_dataset(plan, work, out_dir, run_id, pool, coordinator), plan, pool[0]):
                totals.add(report)
                if rt.max_error_rate is not None and totals.rows >= min(totals.todo, ERROR_RATE_MIN_ROWS):
                    rate = totals.errors / max(1, totals.rows)
                    if rate > rt.max_error_rate:
                        raise RunFailed(
                            f"aborted: {totals.errors} of {totals.rows} rows failed ({rate:.1%}), over "
                            f"runtime.max_error_rate {rt.max_error_rate:.1%}. Errors by kind: {dict(totals.error_kinds)}. "
                            f"Committed parts stay in {out_dir}; fix the input and rerun with --resume."
                        )
                if channel and (time.monotonic() - last >= 0.5 or totals.rows == totals.todo):
                    last = time.monotonic()
                    with lock:
                        channel(totals.snapshot())
        totals.worker_deaths += ray.get(coordinator.worker_deaths.remote())
        totals.actor_gpu_ids.update(ray.get(coordinator.gpu_ids.remote()))
        totals.actor_devices.update(ray.get(coordinator.devices_of.remote()))
        totals.device_failures.extend(ray.get(coordinator.device_failures.remote()))
    except Exception as exc:  # anything Ray raised: one line for the user, the traceback in a file
        if isinstance(exc, RayInferError) and not isinstance(getattr(exc, "cause", None), BaseException):
            raise  # rayinfer's own, raised here in the driver (error budget, pool start timeout)
        failure = run_failure(exc, run_id, out_dir)
        if isinstance(failure, PoolLost):
            failure.nodes = {n["NodeID"] for n in alive}
            # Ray Data may leave the failed pool's actors alive, holding the resources a new pool needs
            try:
                for handle in ray.get(coordinator.all_actors.remote(), timeout=30):
                    ray.kill(handle, no_restart=True)
            except Exception as err:
                log.debug("rayinfer: releasing the lost pool: %s", err)
        raise failure from None
    finally:
        if isinstance(channel, TerminalProgress):
            channel.close()
        try:
            ray.kill(coordinator)
        except Exception:  # Ray already going down (a second Ctrl-C)
            pass
    if watcher.stopped and totals.committed_rows < totals.todo:
        raise Stopped(f"stopped: {totals.committed_rows} rows committed in this run, in complete parts that stay in "
                      f"{out_dir}; {rest} {totals.todo - totals.committed_rows}")


def finish(
    plan: Plan, out_dir: str, run_id: str, started_at: datetime, duration: float, totals: RunTotals, resumed_rows: int
) -> dict[str, Any]:
    """Check that the committed parts cover every input row exactly once, then write the manifest."""
    store = Store(out_dir)
    out_rows, errors, footers = check_output(store, plan.files)
    spec = plan.spec
    first = totals.first_commit_at
    manifest = {
        "run_id": run_id,
        "status": "complete",
        "task": plan.task_cls.name,
        "plugin": plan.plugin,
        "model": spec.model,
        "adapter": spec.adapter,
        "identity": plan.identity(),
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "duration_s": round(duration, 3),
        "cold_start_s": round(first - started_at.timestamp(), 3) if first is not None else None,
        "input": {"path": spec.input.path, "files": len(plan.files), "rows": plan.total_rows,
                  "resolved": absolute(spec.input.path), "duplicate_id_rows": plan.duplicate_id_rows},
        "rows": out_rows,
        "rows_this_run": totals.rows,
        "rows_resumed": resumed_rows,
        "worker_deaths": totals.worker_deaths,
        "worker_memory_kills": totals.memory_kills,
        "errors": errors,
        "errors_this_run_by_kind": dict(totals.error_kinds),
        "rows_per_s": round(totals.rows / duration, 2) if duration > 0 else None,
        "tokens": totals.tokens,
        "padded_tokens": totals.padded_tokens,
        "tokens_per_s": round(totals.tokens / duration, 1) if duration > 0 else None,
        "padding_overhead": round(totals.padded_tokens / totals.tokens - 1, 4) if totals.tokens else None,
        "actors": dict(totals.actor_rows),
        "actor_peak_rss_mb": {k: round(v, 1) for k, v in totals.actor_peak_rss_mb.items()},
        "actor_memory_need": {where: need.summary() for where, need in plan.memory.items()},
        "actor_busy_s": {k: round(v, 2) for k, v in totals.actor_busy_s.items()},
        "actor_ready_s": {k: round(v - started_at.timestamp(), 3) for k, v in totals.actor_ready_at.items()},
        "actor_gpu_ids": dict(sorted(totals.actor_gpu_ids.items())),
        "actor_devices": dict(sorted(totals.actor_devices.items())),
        "device_failures": totals.device_failures,
        "parts": [name for name, _ in footers],
        "part_rows": {"min": min((md.num_rows for _, md in footers), default=0),
                      "max": max((md.num_rows for _, md in footers), default=0)},
        "output_columns": plan.output_schema.names,
        "spec": spec.to_dict(),
        "versions": versions(),
    }
    try:
        write_manifest(store, manifest)
    except OSError as exc:
        raise RunFailed(f"every row is committed in {out_dir}, but the manifest could not be written ({exc}); "
                        "free space and rerun with --resume, which only writes it") from None
    return manifest
