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
import os
import queue
import resource
import threading
import time
from typing import Any, Iterator

import pyarrow as pa

from rayinfer.errors import RowError, RunFailed
from rayinfer.io.folder import unit_todo
from rayinfer.io.parts import PartWriter, RowReplacer
from rayinfer.io.rows import RowBatch, read_rows
from rayinfer.io.scan import InputFile
from rayinfer.io.store import Store
from rayinfer.models.load import LoadContext, check_cuda
from rayinfer.run.coordinator import crash_pieces
from rayinfer.run.failures import first_line
from rayinfer.run.progress import WorkReport
from rayinfer.run.unit import PREFETCH_BATCHES, _rss_mb, release_memory
from rayinfer.task.base import Task
from rayinfer.task.runner import BatchStats, TaskRunner

log = logging.getLogger("rayinfer")


REPORT_EVERY_S = 1.0  # an actor's progress reports, besides one per committed part


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
                            f"{type(exc).__name__}: {first_line(exc)}") from None
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
