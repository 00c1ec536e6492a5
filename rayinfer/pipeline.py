"""The Ray Data graph: work units -> read tasks -> actor pool (load once, run, commit) -> driver.

    from_items(units) --map_batches(read_units, tasks)--> rows with (file, row) coordinates
                      --map_batches(TaskActor, ActorPoolStrategy)--> one summary row per part
                      --iter_batches on the driver--> progress, error-rate guard, manifest

Actors commit their own parts (see ``rayinfer.output``), so only small summaries travel back
to the driver: memory stays bounded however large the corpus.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import resource
import sys
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.parquet as pq

from rayinfer import __version__
from rayinfer.api import Plan
from rayinfer.errors import InputError, RunError
from rayinfer.inputs import FILE_COL, ROW_COL, make_units, merge_ranges, read_unit
from rayinfer.output import PartWriter, Store, committed_coverage, part_coverage, part_metadata, prepare, write_manifest
from rayinfer.storage import is_uri, local_path
from rayinfer.runner import ERROR_COL, BatchStats, TaskRunner
from rayinfer.spec import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS
from rayinfer.task import LoadContext, Task

log = logging.getLogger("rayinfer")

READ_TASK_CPUS = 0.25  # reading Parquet is light; a full CPU per read task starves small machines


class TaskActor:
    """One model replica: loads the task once, then runs and commits batches."""

    def __init__(
        self,
        task_cls: type[Task],
        options: dict[str, Any],
        context: LoadContext,
        column_map: dict[str, str],
        id_column: str,
        keep: list[str],
        max_batch_tokens: int,
        out_dir: str,
        schema: pa.Schema,
        provenance: dict[str, Any],
    ) -> None:
        import ray

        self.task = task_cls(task_cls.Options.model_validate(options), context)
        self.task.load()
        self.runner = TaskRunner(
            self.task, column_map=column_map, id_column=id_column, keep=keep, max_batch_tokens=max_batch_tokens
        )
        self.schema = schema
        self.writer = PartWriter(out_dir, schema, provenance)
        self.where = f"{ray.get_runtime_context().get_node_id()[:12]}:{os.getpid()}"
        self.ready_at = time.time()  # model loaded: what follows is steady-state work

    def __call__(self, batch: pa.Table) -> pa.Table:
        started = time.perf_counter()
        stats = BatchStats()
        out = self.runner.run_table(batch, self.schema, stats)
        files = batch.column(FILE_COL).to_pylist()
        rows = batch.column(ROW_COL).to_pylist()
        name = self.writer.commit(out, files, rows)
        return pa.table(
            {
                "part": [name],
                "rows": [stats.rows],
                "errors": [stats.errors],
                "error_kinds": [json.dumps(dict(stats.error_kinds))],
                "tokens": [stats.tokens],
                "padded_tokens": [stats.padded_tokens],
                "compute_s": [time.perf_counter() - started],
                "actor": [self.where],
                "committed_at": [time.time()],
                "ready_at": [self.ready_at],
                "peak_rss_mb": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024],
            }
        )


def _read_units(batch: pa.Table, columns: list[str]) -> Iterator[pa.Table]:
    for unit in batch.to_pylist():
        yield from read_unit(unit, columns)


def init_ray(address: str | None) -> bool:
    """Join ``address``, or start the embedded local Ray; True when this started a local one
    (which, unlike a cluster, never grows)."""
    import ray

    if ray.is_initialized():
        return False
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return False
    ray.init(
        include_dashboard=False,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    return True


def pool_size(plan: Plan, cluster: dict[str, float]) -> tuple[int, int]:
    """The actor pool's (min, max): from the spec, or what the cluster's resources can hold."""
    rt = plan.spec.runtime
    if isinstance(rt.actors, int):
        return rt.actors, rt.actors
    if rt.actors is not None:
        return rt.actors.min, rt.actors.max
    if rt.num_gpus > 0:
        fit = int(cluster.get("GPU", 0) // rt.num_gpus)
    else:
        # leave room for the read tasks, or a small machine deadlocks
        fit = int((cluster.get("CPU", 1) - READ_TASK_CPUS) // rt.num_cpus)
    return 1, max(1, fit)


def default_batch_tokens(plan: Plan) -> int:
    """The token budget per forward pass when the spec sets none: large on GPUs; on CPUs small
    for encoders (bigger passes run slower there) but large for generation, whose decode steps
    cost about the same for 8 rows as for 32 (measured in benchmarks/)."""
    if plan.spec.runtime.num_gpus > 0:
        return GPU_BATCH_TOKENS
    return plan.task_cls.cpu_batch_tokens or CPU_BATCH_TOKENS


def actor_need(plan: Plan) -> dict[str, float]:
    """What one actor asks Ray for: CPUs, GPUs and custom resources (those above zero)."""
    rt = plan.spec.runtime
    return {k: v for k, v in {"CPU": rt.num_cpus, "GPU": rt.num_gpus, **rt.resources}.items() if v > 0}


def describe(need: dict[str, float]) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in need.items())


def check_resources(
    plan: Plan, cluster: dict[str, float], nodes: list[dict[str, float]] | None = None, pool_min: int = 1,
    can_grow: bool = True,
) -> None:
    """Fail now, not by waiting forever, when no node can hold one actor, or when a Ray that
    cannot grow cannot hold the pool's first ``pool_min`` actors (check_pool_fits)."""
    rt = plan.spec.runtime
    if rt.num_gpus > 0 and cluster.get("GPU", 0) < rt.num_gpus:
        raise RunError(
            f"runtime.num_gpus is {rt.num_gpus} but the Ray cluster has {cluster.get('GPU', 0):g} GPUs. "
            "Set runtime.num_gpus: 0 to run on CPUs, or join a cluster with GPUs (--address)."
        )
    if rt.num_cpus + READ_TASK_CPUS > cluster.get("CPU", 0):
        raise RunError(
            f"runtime.num_cpus is {rt.num_cpus} but the Ray cluster has {cluster.get('CPU', 0):g} CPUs; "
            f"one actor plus its read tasks needs {rt.num_cpus + READ_TASK_CPUS:g}"
        )
    for name, amount in rt.resources.items():
        if cluster.get(name, 0) < amount:
            raise RunError(f"runtime.resources asks for {amount:g} {name!r} but the cluster has {cluster.get(name, 0):g}")
    need = actor_need(plan)
    if nodes and not any(all(n.get(k, 0) >= v for k, v in need.items()) for n in nodes):
        have = "; ".join(", ".join(f"{k}={n.get(k, 0):g}" for k in need) for n in nodes)
        raise RunError(f"no node can hold one actor ({describe(need)}); nodes have: {have}")
    if nodes:
        check_pool_fits(plan, pool_min, nodes, can_grow)


def actors_that_fit(need: dict[str, float], nodes: list[dict[str, float]]) -> int:
    """How many actors needing ``need`` the nodes hold at once while one read task
    (READ_TASK_CPUS) can still run somewhere: with every CPU taken by actors, reading stops."""

    def fit(node: dict[str, float]) -> int:
        return int(min(node.get(k, 0) / v for k, v in need.items()))

    plain = [fit(n) for n in nodes]
    best = 0
    for i, node in enumerate(nodes):
        spared = fit({**node, "CPU": node.get("CPU", 0) - READ_TASK_CPUS})
        best = max(best, sum(plain) - plain[i] + spared)
    return best


def check_pool_fits(plan: Plan, pool_min: int, nodes: list[dict[str, float]], can_grow: bool) -> None:
    """The embedded Ray cannot grow: a pool it cannot hold beside its read tasks fails now rather
    than waiting out runtime.actor_start_timeout_s (or, with reads starved, forever). A cluster may
    grow (an autoscaler), so there it is a warning and the run waits."""
    rt = plan.spec.runtime
    need = actor_need(plan)
    fits = actors_that_fit(need, nodes)
    if pool_min <= fits:
        return
    msg = (
        f"runtime.actors asks for {pool_min} actors of {describe(need)} from the start; the "
        f"{'cluster' if can_grow else 'local Ray'} holds {fits} beside the read tasks "
        f"(CPU={READ_TASK_CPUS:g})"
    )
    if not can_grow:
        raise RunError(f"{msg}. Set runtime.actors to at most {max(fits, 1)}, or {{min: 1, max: {pool_min}}}.")
    print(f"rayinfer: warning: {msg}; waiting up to runtime.actor_start_timeout_s={rt.actor_start_timeout_s}s "
          "for more nodes", file=sys.stderr)


def _probe_paths(inputs: list[str], output: str | None) -> list[str]:
    """Run on a node: which of the local paths it cannot see (or write, for the output)."""
    missing = [p for p in inputs if not os.path.exists(p)]
    if output is None:
        return missing
    parent = Path(output)
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        missing.append(f"{output} (not writable)")
    return missing


def check_paths_visible(plan: Plan, out_dir: str) -> None:
    """On a multi-node cluster, local input/output paths must be visible from every node (a
    shared file system); otherwise fail now, naming the node, rather than mid-run."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    inputs = [p for p in (local_path(f.path) for f in plan.files) if p is not None]
    output = local_path(out_dir)
    if len(nodes) < 2 or (not inputs and output is None):
        return
    probe = ray.remote(num_cpus=0)(_probe_paths)
    sample = inputs[:50]  # enough to catch a node without the file system
    pending = {
        n["NodeManagerAddress"] + " " + n["NodeID"][:12]: probe.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)
        ).remote(sample, output)
        for n in nodes
    }
    for node, ref in pending.items():
        missing = ray.get(ref, timeout=60)
        if missing:
            raise InputError(
                f"node {node} cannot see {', '.join(missing[:3])}: on a multi-node cluster input and output "
                "paths must be on a file system every node mounts, or object-store URIs (s3://, gs://, ...)"
            )


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "rayinfer": __version__}
    for pkg in ("ray", "torch", "transformers", "peft", "pyarrow", "pluggy", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def execute(plan: Plan, address: str | None = None, progress: bool = False) -> dict[str, Any]:
    """Run a planned job and return its manifest (also written to ``output.path``)."""
    spec = plan.spec
    rt = spec.runtime
    out_dir = spec.output.path if is_uri(spec.output.path) else os.path.abspath(os.path.expanduser(spec.output.path))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
    started_at = datetime.now(timezone.utc)
    t0 = time.perf_counter()

    prepare(out_dir, spec.output.mode)
    coverage, resumed_rows = committed_coverage(out_dir) if spec.output.mode == "resume" else ({}, 0)
    units = make_units(plan.files, coverage)
    todo = sum(u["todo"] for u in units)

    totals = BatchStats()
    actors: Counter = Counter()
    peak_rss: dict[str, float] = {}
    busy: Counter = Counter()
    ready: dict[str, float] = {}
    cold_start_s = None
    if units:
        import ray
        import ray.data

        local = init_ray(address)
        cluster = ray.cluster_resources()
        lo, hi = pool_size(plan, cluster)
        check_resources(plan, cluster, [n["Resources"] for n in ray.nodes() if n.get("Alive")], lo, can_grow=not local)
        check_paths_visible(plan, out_dir)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        ctx.print_on_execution_start = False
        # Ray Data's default feeds the first actor that is ready and places the others later, when
        # read tasks may hold the CPUs they need: a pool of N then ran as 1 on a busy cluster.
        ctx.wait_for_min_actors_s = rt.actor_start_timeout_s
        logging.getLogger("ray.data").setLevel(logging.WARNING)

        threads = None if rt.num_gpus > 0 else max(1, math.ceil(rt.num_cpus))
        ds = ray.data.from_items(units, override_num_blocks=len(units))
        ds = ds.map_batches(
            _read_units,
            fn_kwargs={"columns": plan.read_columns},
            batch_size=1,
            batch_format="pyarrow",
            num_cpus=READ_TASK_CPUS,
        )
        ds = ds.map_batches(
            TaskActor,
            fn_constructor_kwargs=dict(
                task_cls=plan.task_cls,
                options=plan.options.model_dump(mode="json"),
                context=plan.load_context(num_threads=threads),
                column_map=plan.column_map,
                id_column=spec.input.id_column,
                keep=[k for k in spec.input.keep if k != spec.input.id_column],
                max_batch_tokens=rt.max_batch_tokens or default_batch_tokens(plan),
                out_dir=out_dir,
                schema=plan.output_schema,
                provenance=plan.provenance(run_id),
            ),
            batch_size=rt.batch_size,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(min_size=lo, max_size=hi),
            num_cpus=rt.num_cpus,
            num_gpus=rt.num_gpus or None,
            resources=rt.resources or None,
        )
        last_report = 0.0
        for summary in _summaries(ds, plan, lo):
            for row in summary.to_pylist():
                # the actor's commit time, not when the driver hears of it (Ray Data may hand
                # summaries over late): the time from the start of the run to the first committed row
                first = row["committed_at"] - started_at.timestamp()
                cold_start_s = first if cold_start_s is None else min(cold_start_s, first)
                totals.rows += row["rows"]
                totals.errors += row["errors"]
                totals.tokens += row["tokens"]
                totals.padded_tokens += row["padded_tokens"]
                totals.error_kinds.update(json.loads(row["error_kinds"]))
                actors[row["actor"]] += row["rows"]
                peak_rss[row["actor"]] = max(peak_rss.get(row["actor"], 0.0), row["peak_rss_mb"])
                busy[row["actor"]] += row["compute_s"]
                ready[row["actor"]] = row["ready_at"] - started_at.timestamp()
            if rt.max_error_rate is not None and totals.rows >= min(todo, 100):
                rate = totals.errors / max(1, totals.rows)
                if rate > rt.max_error_rate:
                    raise RunError(
                        f"aborted: {totals.errors} of {totals.rows} rows failed ({rate:.1%}), over "
                        f"runtime.max_error_rate {rt.max_error_rate:.1%}. Errors by kind: {dict(totals.error_kinds)}. "
                        f"Committed parts stay in {out_dir}; fix the input and rerun with --resume."
                    )
            if progress and time.perf_counter() - last_report > 2:
                last_report = time.perf_counter()
                elapsed = time.perf_counter() - t0
                print(
                    f"rayinfer: {totals.rows}/{todo} rows ({totals.rows / max(1, todo):.0%}), "
                    f"{totals.errors} errors, {totals.rows / elapsed:.1f} rows/s",
                    file=sys.stderr,
                )

    duration = time.perf_counter() - t0
    return finish(
        plan, out_dir, run_id, started_at, duration, cold_start_s, totals, resumed_rows, actors, peak_rss, busy, ready
    )


def _is_pool_start_timeout(exc: BaseException | None) -> bool:
    import ray

    return isinstance(exc, ray.exceptions.GetTimeoutError) and "starting actors" in str(exc)


class _QuietPoolStartTimeout(logging.Filter):
    """Ray Data logs the pool's start timeout as an internal error ("please open an issue", a full
    stack trace) before raising it; rayinfer reports it in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return not _is_pool_start_timeout(exc)


def _summaries(ds, plan: Plan, pool_min: int):
    """The actors' summary rows, with Ray Data's timeout on starting the pool made plain."""
    rt = plan.spec.runtime
    quiet = _QuietPoolStartTimeout()
    ray_data_errors = logging.getLogger("ray.data.exceptions")
    ray_data_errors.addFilter(quiet)
    try:
        yield from ds.iter_batches(batch_size=None, batch_format="pyarrow")
    except Exception as exc:
        if not _is_pool_start_timeout(exc):
            raise
        raise RunError(
            f"the actor pool's first {pool_min} actor(s) ({describe(actor_need(plan))} each) did not load within "
            f"runtime.actor_start_timeout_s={rt.actor_start_timeout_s}s: the cluster cannot hold them now. Lower "
            "runtime.actors (or use {min: 1, max: N} to start with what fits), free or add resources, or raise the timeout."
        ) from None
    finally:
        ray_data_errors.removeFilter(quiet)


def _count_errors(store: Store, name: str, md: pq.FileMetaData) -> int:
    """Rows with an error, from the Parquet footer's null counts (no data read)."""
    leaf = next(j for j in range(md.num_columns) if md.row_group(0).column(j).path_in_schema == ERROR_COL) if md.num_row_groups else None
    count = 0
    for rg in range(md.num_row_groups):
        stats = md.row_group(rg).column(leaf).statistics
        if stats is None or not stats.has_null_count:  # a writer without statistics: read the column
            with store.open(name) as f:
                return len(pq.read_table(f, columns=[ERROR_COL]).column(ERROR_COL).drop_null())
        count += md.row_group(rg).num_rows - stats.null_count
    return count


def finish(
    plan: Plan,
    out_dir: str,
    run_id: str,
    started_at: datetime,
    duration: float,
    cold_start_s: float | None,
    totals: BatchStats,
    resumed_rows: int,
    actors: Counter,
    peak_rss: dict[str, float] | None = None,
    busy: Counter | None = None,
    ready: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Check that the committed parts cover every input row exactly once, then write the manifest."""
    store = Store(out_dir)
    parts = store.parts()
    cover: dict[str, list[tuple[int, int]]] = {}
    out_rows = 0
    errors = 0
    for name in parts:
        md = part_metadata(store, name)
        out_rows += md.num_rows
        errors += _count_errors(store, name, md)
        for f, ranges in part_coverage(store, name).items():
            cover.setdefault(f, []).extend(ranges)
    in_rows = plan.total_rows
    for f in plan.files:
        merged = merge_ranges(cover.get(f.path, []))
        if merged != ([(0, f.num_rows)] if f.num_rows else []) or sum(b - a for a, b in cover.get(f.path, [])) != f.num_rows:
            raise RunError(
                f"output check failed: the parts in {out_dir} cover rows {merged} of {f.path} "
                f"({f.num_rows} rows). This is a bug; please report it with the manifest."
            )
    if out_rows != in_rows:
        raise RunError(f"output check failed: {out_rows} output rows for {in_rows} input rows")

    spec = plan.spec
    manifest = {
        "run_id": run_id,
        "status": "complete",
        "task": plan.task_cls.name,
        "plugin": plan.plugin,
        "model": spec.model,
        "adapter": spec.adapter,
        "started_at": started_at.isoformat(),
        "finished_at": datetime.now(timezone.utc).isoformat(),
        "duration_s": round(duration, 3),
        "cold_start_s": round(cold_start_s, 3) if cold_start_s is not None else None,
        "input": {"path": spec.input.path, "files": len(plan.files), "rows": in_rows},
        "rows": out_rows,
        "rows_this_run": totals.rows,
        "rows_resumed": resumed_rows,
        "errors": errors,
        "errors_this_run_by_kind": dict(totals.error_kinds),
        "rows_per_s": round(totals.rows / duration, 2) if duration > 0 else None,
        "tokens": totals.tokens,
        "padded_tokens": totals.padded_tokens,
        "actors": dict(actors),
        "actor_peak_rss_mb": {k: round(v, 1) for k, v in (peak_rss or {}).items()},
        "actor_busy_s": {k: round(v, 2) for k, v in (busy or {}).items()},
        "actor_ready_s": {k: round(v, 3) for k, v in (ready or {}).items()},
        "parts": parts,
        "output_columns": plan.output_schema.names,
        "spec": spec.to_dict(),
        "versions": versions(),
    }
    write_manifest(store, manifest)
    return manifest
