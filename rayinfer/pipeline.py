"""The Ray Data graph: work units -> actor pool (load once; read, run, commit) -> driver.

    from_items(units) --map_batches(TaskActor, ActorPoolStrategy, one unit at a time)-->
        WorkReports (about one a second, and one per committed part)
    --iter_batches on the driver--> RunTotals -> progress, error budget, manifest

Each actor reads its own units (a unit is a range of rows of one input file): rows never
travel through Ray's object store, nothing competes with the actors for CPUs, and an actor
writes a unit's output into parts sized for readers (``output.part_rows``/``part_bytes``)
instead of a file per batch. In GPU actors a second thread reads and tokenizes the next batch
while the model runs on this one. Only small reports travel back to the driver.

A small Coordinator actor per run (rayinfer/coordinator.py) carries what the actors share: the
batches in flight when a worker died (to isolate a row that kills its worker) and the stop flag
(Ctrl-C, SIGTERM: actors commit the rows they hold and take no new unit). ``rayinfer
retry-errors`` runs through the same actors, with a unit per part that holds error rows.
"""

from __future__ import annotations

import logging
import math
import os
import platform
import queue
import resource
import signal
import sys
import threading
import time
import uuid
import dataclasses
import errno
import functools
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Callable, Iterator

import pyarrow as pa

from rayinfer import __version__
from rayinfer.coordinator import Coordinator, crash_pieces
from rayinfer.admission import actor_need, check_paths_visible, check_resources, describe, pool_size
from rayinfer.errors import RayInferError, RowError, RunError, RunFailed, Stopped
from rayinfer.inputs import InputFile, RowBatch, covered_count, make_units, read_rows
from rayinfer.models import check_cuda
from rayinfer.output import (PartWriter, RowReplacer, Store, committed_coverage, count_errors, prepare, resume_coverage, unit_todo,
                             verify_coverage, write_manifest)
from rayinfer.plan import Plan
from rayinfer.progress import RunTotals, TerminalProgress, WorkReport
from rayinfer.runner import ERROR_COL, BatchStats, TaskRunner
from rayinfer.spec import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS
from rayinfer.storage import is_uri
from rayinfer.task import LoadContext, Task

log = logging.getLogger("rayinfer")

REPORT_EVERY_S = 1.0  # an actor's progress reports, besides one per committed part
UNITS_PER_ACTOR = 4  # a job too small for this many part_rows units per actor gets smaller units
PREFETCH_BATCHES = 2  # batches read and tokenized ahead of the model, per actor
NODE_CHECK_S = 5.0  # how often the driver looks for nodes that died under the pool
NODE_DEATH_WAIT_S = 90.0  # after a lost worker: how long to wait for Ray to declare its node dead
POOL_RESTARTS = 3  # times a run goes on with a new pool after losing workers Ray could not bring back
ERROR_RATE_MIN_ROWS = 1000  # runtime.max_error_rate is judged once this many rows are done (or all)


class TaskActor:
    """One model replica: loads the task once, then reads, runs and commits whole work units."""

    def __init__(
        self,
        task_cls: type[Task],
        options: dict[str, Any],
        context: LoadContext,
        column_map: dict[str, str],
        id_column: str,
        keep: list[str],
        read_columns: list[str],
        files: dict[str, InputFile],
        on_unreadable: str,
        batch_size: int,
        max_batch_tokens: int,
        out_dir: str,
        schema: pa.Schema,
        provenance: dict[str, Any],
        part_bytes: int,
        prefetch: bool = False,
        coordinator: Any = None,
        crash_retries: int = 1,
        max_worker_deaths: int = 30,
    ) -> None:
        import ray

        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        check_cuda(gpu_ids, context.device, ray.util.get_node_ip_address())
        self.task = task_cls(task_cls.Options.model_validate(options), context)
        try:
            self.task.load()
        except Exception as exc:  # rayinfer's line for the driver, instead of Ray's "actor died"
            what = f"model {context.model!r}" + (f" with adapter {context.adapter!r}" if context.adapter else "")
            raise RunFailed(f"the {what} failed to load in an actor on {ray.util.get_node_ip_address()}: "
                            f"{type(exc).__name__}: {_first_line(exc)}") from None
        self.runner = TaskRunner(
            self.task, column_map=column_map, id_column=id_column, keep=keep, max_batch_tokens=max_batch_tokens
        )
        self.read_columns = read_columns
        self.files = files
        self.on_unreadable = on_unreadable
        self.prefetch = prefetch
        self.batch_size = batch_size
        self.schema = schema
        self.store = Store(out_dir)
        self.provenance = provenance
        self.part_bytes = part_bytes
        self.coordinator = coordinator
        self.crash_retries = crash_retries
        self.max_worker_deaths = max_worker_deaths
        self.stopping = False
        runtime = ray.get_runtime_context()
        self.where = f"{runtime.get_node_id()[:12]}:{os.getpid()}"
        if coordinator is not None:
            self._call("register", runtime.get_actor_id(), runtime.current_actor, runtime.get_node_id(), self.where,
                       gpu_ids)
        self.ready_at = time.time()  # model loaded: what follows is steady-state work

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        for unit in units.to_pylist():
            yield from self.run_unit(unit)

    def run_unit(self, unit: dict[str, Any]) -> Iterator[pa.Table]:
        """THE unit loop, for runs and retries alike: read the unit's rows (in input order), run
        them, hand the output to the unit's sink; yield a WorkReport about once a second and at
        every commit. A run's sink commits parts as they fill; a retry's (``unit["part"]``: the
        part whose error rows these are) replaces the rows in that part when the unit ends.

        A unit Ray retries (its first actor died) first skips what that attempt committed, then
        runs its batches under the coordinator's watch (see rayinfer/coordinator.py)."""
        first, last = unit["ranges"][0][0], unit["ranges"][-1][1] - 1
        key = f"{unit.get('part') or unit['file']}:{first}-{last}"
        what = f"the error rows of {unit['part']}" if unit.get("part") else f"rows {first}-{last} of {unit['file']}"
        crashes = self._start(key, what)
        if crashes is False:  # the run is stopping: leave the unit to the resume
            yield self._send(self._report(), BatchStats(), [])
            return
        if unit.get("part"):
            sink: Any = RowReplacer(self.store, unit, self.schema, self.runner.id_column, self.provenance)
        else:
            unit = unit_todo(self.store, unit)
            sink = PartWriter(self.store, self.schema, self.provenance, self.part_bytes)
        report, stats, last_report = self._report(), BatchStats(), time.monotonic()
        try:
            for batch, prepared in self._batches(unit, crashes):
                started = time.perf_counter()
                out = self._output(key, batch, prepared, stats)
                committed = sink.write(unit["file"], out, batch.rows, unit["fingerprint"])
                report.busy_s += time.perf_counter() - started
                if committed or time.monotonic() - last_report >= REPORT_EVERY_S:
                    yield self._send(report, stats, committed)
                    report, stats, last_report = self._report(), BatchStats(), time.monotonic()
                    if self.stopping:  # commit what is done; a resume (or another retry) does the rest
                        break
            committed = sink.close()
        except BaseException:
            sink.abort()
            raise
        yield self._send(report, stats, committed)

    def _start(self, key: str, what: str) -> dict[tuple[int, int], int] | None | bool:
        """Tell the coordinator that work ``key`` starts. Returns False when the run is stopping,
        None on its first attempt, else the batches in flight when its earlier workers died."""
        state = self._call("start", key)
        if state["stop"]:
            return False
        if state["deaths"] > self.max_worker_deaths:
            raise RunFailed(
                f"{what} killed {state['deaths']} worker processes (over runtime.max_worker_deaths="
                f"{self.max_worker_deaths}): more than a bad row explains (out of memory? a failing node?); the workers' "
                "own logs are in Ray's session folder (session_latest/logs)"
            )
        if state["attempt"] == 1:
            return None
        log.warning("rayinfer: a worker died running %s (%s death(s) so far); running them batch by batch under "
                    "watch, to isolate a row that kills", what, state["deaths"])
        return {(a, b): n for a, b, n in state["crashes"]}

    def _output(self, key: str, batch: RowBatch, prepared: Any, stats: BatchStats) -> pa.Table:
        """The output rows of one batch from ``_batches``."""
        if batch.problem is not None:  # a malformed record, or an unreadable chunk with on_unreadable: skip
            problem = batch.problem
            error = problem if isinstance(problem, RowError) else RowError(problem, "unreadable")
            return self.runner.error_table(len(batch.rows), self.schema, error, stats, batch.table)
        table = batch.table
        assert table is not None
        if isinstance(prepared, RowError):  # a row that killed its worker, isolated
            return self.runner.error_table(len(batch.rows), self.schema, prepared, stats, table)
        if prepared is None:  # a batch of work whose worker died: run under watch
            self._call("begin", key, batch.rows[0].as_py(), batch.rows[-1].as_py())
            out = self.runner.complete_table(table, self.runner.prepare_table(table), self.schema, stats)
            self._call("end", key)
            return out
        return self.runner.complete_table(table, prepared, self.schema, stats)

    def _read(self, unit: dict[str, Any]) -> Iterator[RowBatch]:
        return read_rows(self.files[unit["file"]], unit["ranges"], self.read_columns, self.batch_size,
                         self.on_unreadable, self.runner.id_column)

    def _call(self, method: str, *args: Any) -> Any:
        """Call the run's coordinator (none when the actor runs outside a run, as in some tests)."""
        if self.coordinator is None:
            return {"attempt": 1, "deaths": 0, "stop": False, "crashes": []} if method == "start" else False
        import ray

        return ray.get(getattr(self.coordinator, method).remote(*args))

    def _batches(self, unit: dict[str, Any], crashes: dict[tuple[int, int], int] | None
                 ) -> Iterator[tuple[RowBatch, Any]]:
        """The unit's batches, each with what ``_output`` needs to run it. On a unit's first
        attempt: prepared (tokenized) by ``_prepared``. After its worker died (``crashes``: the
        batches in flight at each death): pieces of batches, not prepared (the actor names each
        to the coordinator first, as tokenizing may be what kills), a piece that keeps killing cut
        in halves, and a row that killed its worker more than ``worker_crash_retries`` times
        alone with its RowError. Rows that could not be read come with None."""
        if crashes is None:
            yield from self._prepared(unit)
            return
        for batch in self._read(unit):
            if batch.problem is not None:
                yield batch, None
                continue
            assert batch.table is not None
            numbers = batch.rows.to_pylist()
            for lo, hi, kills in crash_pieces(numbers, crashes, self.crash_retries):
                error = None
                if kills:
                    n = crashes[(numbers[lo], numbers[lo])]
                    error = RowError(f"this row killed the worker process running it, also when run alone ({n}x): a "
                                     "crash in the task or a library it calls (a segfault), or out of memory", "worker_crash")
                yield RowBatch(batch.table.slice(lo, hi - lo), batch.rows.slice(lo, hi - lo)), error

    def _report(self) -> WorkReport:
        return WorkReport(actor=self.where, ready_at=self.ready_at)

    def _send(self, report: WorkReport, stats: BatchStats, committed: list[tuple[str, int]]) -> pa.Table:
        report.rows, report.errors, report.error_kinds = stats.rows, stats.errors, dict(stats.error_kinds)
        report.tokens, report.padded_tokens = stats.tokens, stats.padded_tokens
        report.parts = [name for name, _ in committed]
        report.committed_rows = sum(n for _, n in committed)
        report.at = time.time()
        self.stopping = self.stopping or bool(self._call("stopping"))
        release_memory()  # about once a second: cheap next to a second of work
        report.peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report.rss_mb = _rss_mb()
        return report.to_table()

    def _prepared(self, unit: dict[str, Any]) -> Iterator[tuple[RowBatch, Any]]:
        """The unit's batches, read and tokenized (rows that could not be read: None). GPU actors do it on a second thread, PREFETCH_BATCHES ahead, while
        the GPU computes; CPU actors in turn with the model, as their cores are busy with it (the
        second thread cost CPU actors 15% of their speed: 9,323 -> 8,077 rows/s on 1M rows)."""
        if not self.prefetch:
            for batch in self._read(unit):
                yield batch, None if batch.problem is not None else self.runner.prepare_table(batch.table)
            return
        q: queue.Queue = queue.Queue(maxsize=PREFETCH_BATCHES)
        stop = threading.Event()
        end = object()

        def put(item: Any) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for batch in self._read(unit):
                    if not put((batch, None if batch.problem is not None else self.runner.prepare_table(batch.table))):
                        return
                put(end)
            except BaseException as exc:  # handed to the consuming thread, which raises it
                put(exc)

        thread = threading.Thread(target=produce, name="rayinfer-prefetch", daemon=True)
        thread.start()
        try:
            while True:
                item = q.get()
                if item is end:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()


def release_memory() -> None:
    """Hand freed heap back to the OS. Without it an actor's RSS crept up by ~100-300 bytes per
    row: glibc kept the pages that tokenizing, Arrow and torch had freed (a 50k-row unit of the
    tiny classifier left +40 MB of them for 3 MB of output), and later allocations landed
    elsewhere. With it, RSS stays flat (tests/test_corpus.py)."""
    pa.default_memory_pool().release_unused()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim() -> Any:
    """glibc's malloc_trim, loaded once; None where there is none (macOS, musl)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError):  # not Linux: the peak is the best there is
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def init_ray(address: str | None) -> bool:
    """Join ``address``, or start the embedded local Ray; True when this started a local one
    (which, unlike a cluster, never grows)."""
    import ray

    if ray.is_initialized():
        return False
    # Ray takes SIGTERM over in the driver (a stack dump, then death); keep the caller's handlers
    # (`rayinfer run` stops cleanly on SIGTERM and Ctrl-C: exit 130 and how to resume)
    main = threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
    try:
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
    finally:
        for sig, handler in handlers.items():
            if callable(handler) and signal.getsignal(sig) is not handler:
                signal.signal(sig, handler)


def start_coordinator() -> Any:
    """The run's Coordinator actor, on the driver's node (whose loss ends the run anyway; placed
    elsewhere, soft affinity let it land on a node whose loss then failed every actor's call)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    try:
        node = ray.get_runtime_context().get_node_id()
    except Exception:  # a Ray Client driver has no node of its own
        node = None
    where = NodeAffinitySchedulingStrategy(node, soft=False) if node else None
    return ray.remote(Coordinator).options(num_cpus=0, max_restarts=0, scheduling_strategy=where).remote()


def default_batch_tokens(plan: Plan) -> int:
    """The token budget per forward pass when the spec sets none: large on GPUs; on CPUs small
    for encoders (bigger passes run slower there) but large for generation, whose decode steps
    cost about the same for 8 rows as for 32 (measured in benchmarks/)."""
    if plan.spec.runtime.num_gpus > 0:
        return GPU_BATCH_TOKENS
    return plan.task_cls.cpu_batch_tokens or CPU_BATCH_TOKENS


def unit_rows(todo: int, actors: int, part_rows: int) -> int:
    """Rows per work unit: ``part_rows``, unless that would leave actors idle. Every actor should
    get several units (UNITS_PER_ACTOR), so that every actor works (120 rows on 4 actors make 15
    units of 8) and the last units end close together (3,000 prompts on 8 GPUs: 32 units of 94,
    not 12 of 256 with four GPUs doing two and four doing one)."""
    return max(1, min(part_rows, math.ceil(todo / (actors * UNITS_PER_ACTOR))))


def actor_args(plan: Plan, out_dir: str, run_id: str) -> dict[str, Any]:
    """TaskActor's constructor arguments for a plan."""
    spec, rt = plan.spec, plan.spec.runtime
    return dict(
        task_cls=plan.task_cls,
        options=plan.options.model_dump(mode="json"),
        context=plan.load_context(num_threads=None if rt.num_gpus > 0 else max(1, math.ceil(rt.num_cpus))),
        column_map=plan.column_map,
        id_column=spec.input.id_column,
        keep=[k for k in spec.input.keep if k != spec.input.id_column],
        read_columns=plan.read_columns,
        files={f.path: f for f in plan.files},
        on_unreadable=spec.input.on_unreadable,
        batch_size=rt.batch_size,
        max_batch_tokens=rt.max_batch_tokens or default_batch_tokens(plan),
        out_dir=out_dir,
        schema=plan.output_schema,
        provenance=plan.provenance(run_id),
        part_bytes=spec.output.part_bytes,
        prefetch=rt.num_gpus > 0,
        crash_retries=rt.worker_crash_retries,
        max_worker_deaths=rt.max_worker_deaths,
    )


def build_dataset(plan: Plan, units: list[dict[str, Any]], out_dir: str, run_id: str, pool: tuple[int, int],
                  coordinator: Any = None) -> Any:
    """The whole Ray Data graph: one unit per block, mapped by an actor pool, one unit at a time
    per actor (so a big unit never waits queued behind another while an actor idles)."""
    import ray.data

    rt = plan.spec.runtime
    ds = ray.data.from_items(units, override_num_blocks=len(units))
    return ds.map_batches(
        TaskActor,
        fn_constructor_kwargs={**actor_args(plan, out_dir, run_id), "coordinator": coordinator},
        batch_size=1,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool[0], max_size=pool[1], max_tasks_in_flight_per_actor=1),
        num_cpus=rt.num_cpus,
        num_gpus=rt.num_gpus or None,
        resources=rt.resources or None,
    )


@contextmanager
def data_context(actor_start_timeout_s: int) -> Iterator[None]:
    """rayinfer's Ray Data settings for the run, restored afterwards (a user's own datasets in the
    same process keep theirs)."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    settings = {
        "enable_progress_bars": False,
        "print_on_execution_start": False,
        # Ray Data's default feeds the first actor that is ready and places the others later:
        # a pool of N then ran as 1 on a busy cluster.
        "wait_for_min_actors_s": actor_start_timeout_s,
        # actors yield a small report about once a second: deliver each at once, not when 128 MiB
        # of them have piled up (which, for reports, is never before the unit ends)
        "target_max_block_size": 1,
    }
    # pool {min, max}: add an actor whenever every actor is busy and units wait (Ray Data's default
    # threshold, 175%, needs two units queued per actor, which would leave the last ones unbalanced)
    settings["autoscaling_config"] = dataclasses.replace(ctx.autoscaling_config, actor_pool_util_upscaling_threshold=1.0)
    saved = {k: getattr(ctx, k) for k in settings}
    for k, v in settings.items():
        setattr(ctx, k, v)
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    try:
        yield
    finally:
        for k, v in saved.items():
            setattr(ctx, k, v)


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "rayinfer": __version__}
    for pkg in ("ray", "torch", "transformers", "peft", "pyarrow", "pluggy", "pydantic"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def execute(plan: Plan, address: str | None = None,
            progress: bool | Callable[[dict[str, Any]], None] = False,
            stop: threading.Event | None = None) -> dict[str, Any]:
    """Run a planned job and return its manifest (also written to ``output.path``).

    Setting ``stop`` (from a signal handler or another thread) stops the run cleanly: no new
    unit starts, the actors commit the rows they hold (for up to ``runtime.stop_timeout_s``, then
    the main thread is interrupted), and ``Stopped`` is raised; a resume goes on from there."""
    spec = plan.spec
    out_dir = spec.output.path if is_uri(spec.output.path) else os.path.abspath(os.path.expanduser(spec.output.path))
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ-") + uuid.uuid4().hex[:8]
    started_at = datetime.now(timezone.utc)
    t0 = time.perf_counter()

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
            found = make_units(plan.files, coverage, unit_rows(left, pool[1], spec.output.part_rows))
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
                        str(exc).split("; committed parts")[0], restarts, POOL_RESTARTS)
            _wait_for_node_death(exc.nodes)
            coverage, _ = committed_coverage(out_dir)
            left = sum(f.num_rows - covered_count(coverage.get(f.path, []), 0, f.num_rows) for f in plan.files)
            totals.rows = totals.committed_rows  # rows done but not committed are done again
            totals.worker_deaths += 1
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

    rt = plan.spec.runtime
    local = init_ray(address)
    cluster = ray.cluster_resources()
    pool = pool_size(plan, cluster, can_grow=not local)
    if after_loss:
        pool = (1, pool[1])
    alive = [n for n in ray.nodes() if n.get("Alive")]
    check_resources(plan, cluster, [n["Resources"] for n in alive], pool[0], can_grow=not local)
    check_paths_visible(plan, out_dir)
    work = units(pool)
    channel = TerminalProgress() if progress is True else (progress or None)
    coordinator = start_coordinator()
    watcher = _StopWatcher(stop, coordinator, rt.stop_timeout_s)
    last = 0.0
    try:
        with data_context(rt.actor_start_timeout_s), watcher, _NodeWatcher(coordinator):
            for report in _reports(build_dataset(plan, work, out_dir, run_id, pool, coordinator), plan, pool[0]):
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
                    channel(totals.snapshot())
        totals.worker_deaths += ray.get(coordinator.worker_deaths.remote())
        totals.actor_gpu_ids.update(ray.get(coordinator.gpu_ids.remote()))
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


class _StopWatcher:
    """While a run is on: once ``stop`` is set, tell the actors (through the coordinator) to
    commit what they hold and take no new unit; if they are not done within ``timeout_s``,
    interrupt the main thread (KeyboardInterrupt: parts still open are dropped, never half-seen)."""

    def __init__(self, stop: threading.Event | None, coordinator: Any, timeout_s: int) -> None:
        self.stop, self.coordinator, self.timeout_s = stop, coordinator, timeout_s
        self.done = threading.Event()
        self.stopped = False
        self.thread: threading.Thread | None = None

    def __enter__(self) -> "_StopWatcher":
        if self.stop is not None:
            self.thread = threading.Thread(target=self._watch, name="rayinfer-stop", daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        if self.thread is not None:
            self.thread.join()

    def _watch(self) -> None:
        assert self.stop is not None
        while not self.stop.wait(0.2):
            if self.done.is_set():
                return
        if self.done.is_set():
            return
        self.stopped = True
        self.coordinator.request_stop.remote()
        log.warning("rayinfer: stopping: the actors commit the rows they hold (up to runtime.stop_timeout_s=%ss); "
                    "interrupt again to stop at once", self.timeout_s)
        if not self.done.wait(self.timeout_s):
            log.warning("rayinfer: the actors did not finish within %ss: stopping now (parts still open are "
                        "dropped; a resume redoes their rows)", self.timeout_s)
            import _thread

            _thread.interrupt_main()


class _NodeWatcher:
    """While a run is on, every NODE_CHECK_S: has a node with pool actors on it died? Ray would
    restart those actors elsewhere, but only where their resources are free, and the pool's other
    actors keep theirs while a unit is outstanding: a pool that filled the cluster then waited
    forever (seen on the two-node test cluster). So the dead node's actors are killed for good;
    their units fail, and ``execute`` goes on from the committed parts with a new pool."""

    def __init__(self, coordinator: Any) -> None:
        self.coordinator = coordinator
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="rayinfer-nodes", daemon=True)

    def __enter__(self) -> "_NodeWatcher":
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.done.set()
        self.thread.join()

    def _watch(self) -> None:
        import ray

        while not self.done.wait(NODE_CHECK_S):
            try:
                dead = [n["NodeID"] for n in ray.nodes() if not n.get("Alive")]
                for handle in ray.get(self.coordinator.actors_on.remote(dead)) if dead else []:
                    log.warning("rayinfer: a node of the pool died: its actor is replaced, its open part redone")
                    ray.kill(handle, no_restart=True)
            except Exception as exc:  # Ray going down with the run: nothing left to watch
                log.debug("rayinfer: node watch: %s", exc)


def run_failure(exc: BaseException, run_id: str, out_dir: str) -> RayInferError:
    """What the user sees when a run fails inside Ray: one line (rayinfer's own message where an
    actor raised one, such as an unreadable row group), where the full traceback went, and that
    the committed parts are kept."""
    import traceback

    from rayinfer.catalog import home

    log_file = home() / "logs" / f"{run_id}.log"
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), encoding="utf-8")
        where = f"full traceback in {log_file}"
    except OSError as err:
        where = f"(could not write the traceback to {log_file}: {err})"
    cause = _rayinfer_cause(exc)
    kept = f"committed parts stay in {out_dir} (--resume goes on from them)"
    if cause is not None:
        return RunFailed(f"{_first_line(cause)}; {kept}; {where}")
    init = _actor_init_failure(exc)
    if init is not None:
        return RunFailed(f"{init}; {kept}; {where}")
    lost = _lost_worker(exc)
    if lost is not None:
        return PoolLost(f"the actor pool lost a worker that Ray could not bring back ({type(lost).__name__}: "
                        f"{_first_line(lost)}); {kept}; {where}")
    inner = getattr(exc, "cause", None) or exc
    if isinstance(inner, OSError) and (inner.errno == errno.ENOSPC or "No space left on device" in str(inner)):
        return RunFailed(f"no space left on the device holding {out_dir} (or its temporary files); free space or "
                         f"choose another output.path; {kept}; {where}")
    return RunFailed(f"the run failed: {type(inner).__name__}: {_first_line(inner)}; {kept}; {where}")


class PoolLost(RunFailed):
    """The pool lost a worker (its node died, it became unreachable) in a way Ray Data did not
    recover from by itself: ``execute`` goes on from the committed parts with a new pool.
    ``nodes``: the nodes alive when the pool started."""

    nodes: set[str] = set()


def _wait_for_node_death(nodes: set[str], timeout_s: float = NODE_DEATH_WAIT_S) -> None:
    """Before a new pool starts: wait until Ray has marked dead the node that was lost (it does
    after missed health checks, ~30 s), else the new pool's actors are placed on it and wait
    forever. A worker lost without its node costs the whole wait."""
    import ray

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if nodes - {n["NodeID"] for n in ray.nodes() if n.get("Alive")}:
            return
        time.sleep(1.0)


def _lost_worker(exc: BaseException) -> BaseException | None:
    """The Ray exception saying that a worker or its node is gone (not an error in the task)."""
    import ray

    lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
            ray.exceptions.ObjectLostError)
    return next((e for e in _chain(exc) if isinstance(e, lost) and not getattr(e, "_actor_init_failed", False)), None)


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and every exception inside it, once each: Ray's ``cause`` (the exception raised in
    the worker), ``__cause__`` and ``__context__``."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        cause = getattr(e, "cause", None)
        stack += [cause if isinstance(cause, BaseException) else None, e.__cause__, e.__context__]


def _first_line(exc: BaseException) -> str:
    """The message without what Ray Data appends to a failed task's exception (its retry advice)."""
    text = str(exc).split("Failed to apply UDF transform")[0]
    return (text.strip().strip(":'\"").strip().splitlines() or [""])[0][:300]


def _rayinfer_cause(exc: BaseException) -> RayInferError | None:
    """The RayInferError an actor raised, from inside the exceptions Ray wrapped it in."""
    for e in _chain(exc):
        cause = getattr(e, "cause", None)  # a RayTaskError: the exception raised in the worker
        if isinstance(cause, RayInferError):
            return cause
        if isinstance(e, RayInferError) and not isinstance(cause, BaseException):
            return e
    return None


def _actor_init_failure(exc: BaseException) -> str | None:
    """What made an actor's __init__ fail, from Ray's ActorDiedError (which holds it only as the
    text of the worker's traceback): rayinfer's own line where it raised one (a model that does
    not load), else the exception's last line."""
    import re

    import ray

    for e in _chain(exc):
        if isinstance(e, ray.exceptions.RayActorError) and getattr(e, "_actor_init_failed", False):
            lines = [line.strip() for line in str(e).splitlines()]
            ours = [line.split(": ", 1)[1] for line in lines if re.match(r"rayinfer\.errors\.\w+: ", line)]
            if ours:
                return ours[-1]
            raised = [line for line in lines if re.match(r"[\w.]+(Error|Exception)\b.*: ", line)]
            return "an actor failed to start: " + (raised[-1] if raised else _first_line(e))
    return None


def _is_pool_start_timeout(exc: BaseException | None) -> bool:
    import ray

    return isinstance(exc, ray.exceptions.GetTimeoutError) and "starting actors" in str(exc)


class _QuietRayDataErrors(logging.Filter):
    """Ray Data logs a failed task (and the pool's start timeout, as "please open an issue") with
    a full stack trace on stderr before raising it; rayinfer reports it in one line instead, with
    the traceback in a log file. Ray's own session log keeps everything."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return record.levelno < logging.ERROR and not _is_pool_start_timeout(exc)


@contextmanager
def _quiet_ray_data_errors() -> Iterator[None]:
    quiet = _QuietRayDataErrors()
    targets: list[Any] = [logging.getLogger("ray.data.exceptions")]
    targets += [h for h in logging.getLogger("ray.data").handlers if isinstance(h, logging.StreamHandler)
                and not isinstance(h, logging.FileHandler)]
    for t in targets:
        t.addFilter(quiet)
    try:
        yield
    finally:
        for t in targets:
            t.removeFilter(quiet)


def _reports(ds: Any, plan: Plan, pool_min: int) -> Iterator[WorkReport]:
    """The actors' WorkReports, with Ray Data's timeout on starting the pool made plain."""
    rt = plan.spec.runtime
    with _quiet_ray_data_errors():
        try:
            for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
                yield from WorkReport.from_table(batch)
        except Exception as exc:
            if not _is_pool_start_timeout(exc):
                raise
            raise RunError(
                f"the actor pool's first {pool_min} actor(s) ({describe(actor_need(plan))} each) did not load within "
                f"runtime.actor_start_timeout_s={rt.actor_start_timeout_s}s: the cluster cannot hold them now. Lower "
                "runtime.actors (or use {min: 1, max: N} to start with what fits), free or add resources, or raise "
                "the timeout."
            ) from None


def finish(
    plan: Plan, out_dir: str, run_id: str, started_at: datetime, duration: float, totals: RunTotals, resumed_rows: int
) -> dict[str, Any]:
    """Check that the committed parts cover every input row exactly once, then write the manifest."""
    store = Store(out_dir)
    out_rows, footers = verify_coverage(store, plan.files)
    errors = sum(count_errors(store, name, md) for name, md in footers)
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
                  "resolved": spec.input.path if is_uri(spec.input.path) else os.path.abspath(os.path.expanduser(spec.input.path))},
        "rows": out_rows,
        "rows_this_run": totals.rows,
        "rows_resumed": resumed_rows,
        "worker_deaths": totals.worker_deaths,
        "errors": errors,
        "errors_this_run_by_kind": dict(totals.error_kinds),
        "rows_per_s": round(totals.rows / duration, 2) if duration > 0 else None,
        "tokens": totals.tokens,
        "padded_tokens": totals.padded_tokens,
        "tokens_per_s": round(totals.tokens / duration, 1) if duration > 0 else None,
        "padding_overhead": round(totals.padded_tokens / totals.tokens - 1, 4) if totals.tokens else None,
        "actors": dict(totals.actor_rows),
        "actor_peak_rss_mb": {k: round(v, 1) for k, v in totals.actor_peak_rss_mb.items()},
        "actor_busy_s": {k: round(v, 2) for k, v in totals.actor_busy_s.items()},
        "actor_ready_s": {k: round(v - started_at.timestamp(), 3) for k, v in totals.actor_ready_at.items()},
        "actor_gpu_ids": dict(sorted(totals.actor_gpu_ids.items())),
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
