"""The one unit loop: read a work unit's rows, run the task on them, hand the output to a sink.

``rayinfer run`` and ``rayinfer retry-errors`` both come through ``UnitLoop.run_unit``, with the
same reader (``rayinfer.io.rows.read_rows``, rows in input order). Only the sink differs: a run's
``PartWriter`` commits parts as they fill; a retry's ``RowReplacer`` (the unit names the part whose
error rows it holds) replaces those rows in their part when the unit ends. The loop needs no
Ray: the actor (``rayinfer.run.actor``) hands it a way to call the run's coordinator, and tests
hand it a local ``Coordinator``.
"""

from __future__ import annotations

import functools
import logging
import queue
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator

import psutil
import pyarrow as pa

from rayinfer.errors import RowError, RunFailed
from rayinfer.io.folder import unit_todo
from rayinfer.io.parts import PartWriter, RowReplacer
from rayinfer.io.rows import RowBatch, read_rows
from rayinfer.io.scan import InputFile
from rayinfer.io.store import Store
from rayinfer.run.coordinator import Coordinator, crash_pieces
from rayinfer.run.progress import WorkReport
from rayinfer.task.runner import BatchStats, TaskRunner

log = logging.getLogger("rayinfer")

Segments = list[tuple[int, int]]  # a batch's rows by file: (index of the unit's piece, rows), in order

REPORT_EVERY_S = 1.0  # a unit's progress reports, besides one per committed part
PREFETCH_BATCHES = 2  # batches read and tokenized ahead of the model, per actor


@dataclass(frozen=True)
class UnitSettings:
    """What the unit loop needs from the plan (built by ``rayinfer.run.cluster.actor_args``)."""

    files: dict[str, InputFile]
    read_columns: list[str]
    out_dir: str
    schema: pa.Schema
    provenance: dict[str, Any]
    part_bytes: int
    batch_size: int
    on_unreadable: str = "fail"
    prefetch: bool = False  # read and tokenize on a second thread (GPU actors)
    crash_retries: int = 1
    max_worker_deaths: int = 30
    memory_hint: str = ""  # an actor's memory need and the fixes (admission.memory_hint), for lines about deaths


def local_coordinator() -> Callable[..., Any]:
    """A coordinator in this process, for a loop that runs outside a Ray run (tests, tools)."""
    coordinator = Coordinator()
    return lambda method, *args: getattr(coordinator, method)(*args)


class UnitLoop:
    """Runs whole work units with one loaded task. ``call(method, *args)`` reaches the run's
    Coordinator; ``where`` and ``ready_at`` name the worker in its reports."""

    def __init__(self, runner: TaskRunner, settings: UnitSettings, call: Callable[..., Any] | None = None,
                 where: str = "local", ready_at: float = 0.0) -> None:
        self.runner, self.settings = runner, settings
        self.call = call or local_coordinator()
        self.where, self.ready_at = where, ready_at
        self.store = Store(settings.out_dir)
        self.stopping = False

    def run_unit(self, unit: dict[str, Any]) -> Iterator[pa.Table]:
        """Run one unit; yield a WorkReport (as a one-row table) about once a second and at every
        commit. A unit Ray runs again (its first worker died) first skips what that attempt
        committed, then runs its batches under the coordinator's watch (rayinfer/run/coordinator.py)."""
        key, what = unit_names(unit)
        crashes = self._start(key, what)
        if crashes is False:  # the run is stopping: leave the unit to the resume
            yield self._send(self._report(), BatchStats(), [])
            return
        s = self.settings
        if unit.get("part"):
            sink: Any = RowReplacer(self.store, unit, s.schema, self.runner.id_column, s.provenance)
        else:
            if crashes is not None:  # only an earlier attempt of this unit can have committed some of it
                unit = unit_todo(self.store, unit)
            sink = PartWriter(self.store, s.schema, s.provenance, s.part_bytes)
        report, stats, last_report = self._report(), BatchStats(), time.monotonic()
        try:
            started = time.perf_counter()  # busy: reading and tokenizing a batch, the model, writing
            for segments, batch, out in self._outputs(key, unit, crashes, stats):
                committed, at = [], 0
                for i, n in segments:  # a batch may hold the rows of several small files, one after the other
                    piece = unit["pieces"][i]
                    committed += sink.write(piece["file"], out.slice(at, n), batch.rows.slice(at, n), piece["fingerprint"])
                    at += n
                report.busy_s += time.perf_counter() - started
                if committed or time.monotonic() - last_report >= REPORT_EVERY_S:
                    yield self._send(report, stats, committed)
                    report, last_report = self._report(), time.monotonic()
                    stats.reset()  # in place: a stream of batches counts into it
                    if self.stopping:  # commit what is done; a resume (or another retry) does the rest
                        break
                started = time.perf_counter()
            committed = sink.close()
        except BaseException:
            sink.abort()
            raise
        yield self._send(report, stats, committed)

    def _start(self, key: str, what: str) -> dict[tuple[str, int, int], int] | None | bool:
        """Tell the coordinator that work ``key`` starts. Returns False when the run is stopping,
        None on its first attempt, else the batches in flight when its earlier workers died."""
        state = self.call("start", key)
        if state["stop"]:
            return False
        limit = self.settings.max_worker_deaths
        if state["deaths"] > limit:
            raise RunFailed(
                f"{what} killed {state['deaths']} worker processes (over runtime.max_worker_deaths={limit}): more "
                "than a bad row explains (out of memory? a failing node?); the workers' own logs are in Ray's "
                "session folder (session_latest/logs)"
            )
        if state["attempt"] == 1:
            return None
        log.warning("rayinfer: a worker died running %s (%s death(s) so far); running them batch by batch under "
                    "watch, to isolate a row that kills", what, state["deaths"])
        return {(f, a, b): n for f, a, b, n in state["crashes"]}

    def _outputs(self, key: str, unit: dict[str, Any], crashes: dict[tuple[str, int, int], int] | None,
                 stats: BatchStats) -> Iterator[tuple[Segments, RowBatch, pa.Table]]:
        """The output of each of the unit's batches (``_batches``), in order. A task that streams
        (generate) takes them as one stream on a unit's first attempt: the next batch's rows join
        its decode loop while the last ones' are still decoding (``TaskRunner.stream_tables``)."""
        def file(segments: Segments) -> str:
            return unit["pieces"][segments[0][0]]["file"]

        if crashes is not None or not self.runner.streams:
            for segments, batch, prepared in self._batches(unit, crashes):
                yield segments, batch, self._output(key, file(segments), batch, prepared, stats)
            return
        entries = (((segments, batch), None if prepared is None else (batch.table, prepared))
                   for segments, batch, prepared in self._batches(unit, crashes))
        for (segments, batch), out in self.runner.stream_tables(entries, self.settings.schema, stats):
            yield segments, batch, out if out is not None else self._output(key, file(segments), batch, None, stats)

    def _output(self, key: str, file: str, batch: RowBatch, prepared: Any, stats: BatchStats) -> pa.Table:
        """The output rows of one batch from ``_batches``."""
        schema = self.settings.schema
        if batch.problem is not None:  # a malformed record, or an unreadable chunk with on_unreadable: skip
            problem = batch.problem
            error = problem if isinstance(problem, RowError) else RowError(problem, "unreadable")
            return self.runner.error_table(len(batch.rows), schema, error, stats, batch.table)
        table = batch.table
        assert table is not None
        if isinstance(prepared, RowError):  # a row that killed its worker, isolated
            return self.runner.error_table(len(batch.rows), schema, prepared, stats, table)
        if prepared is None:  # a batch of a unit whose worker died: run under watch
            self.call("begin", key, batch.rows[0].as_py(), batch.rows[-1].as_py(), file)
            out = self.runner.complete_table(table, self.runner.prepare_table(table), schema, stats)
            self.call("end", key)
            return out
        return self.runner.complete_table(table, prepared, schema, stats)

    def _read(self, piece: dict[str, Any]) -> Iterator[RowBatch]:
        s = self.settings
        return read_rows(s.files[piece["file"]], piece["ranges"], s.read_columns, s.batch_size, s.on_unreadable,
                         self.runner.id_column)

    def _batches(self, unit: dict[str, Any], crashes: dict[tuple[str, int, int], int] | None
                 ) -> Iterator[tuple[Segments, RowBatch, Any]]:
        """The unit's batches, file after file, each with its segments (which of the unit's files
        its rows come from) and what ``_output`` needs to run it. On a unit's first attempt: prepared (tokenized) by ``_prepared``. After its
        worker died (``crashes``: the batches in flight at each death): pieces of batches, not
        prepared (the loop names each to the coordinator first, as tokenizing may be what kills),
        a piece that keeps killing cut in halves, and a row that killed its worker more than
        ``crash_retries`` times alone with its RowError. Rows that could not be read come with None."""
        if crashes is None:
            yield from self._prepared(unit)
            return
        for i, piece in enumerate(unit["pieces"]):
            mine = {(a, b): n for (f, a, b), n in crashes.items() if f == piece["file"]}
            for batch in self._read(piece):
                if batch.problem is not None:
                    yield [(i, len(batch.rows))], batch, None
                    continue
                assert batch.table is not None
                numbers = batch.rows.to_pylist()
                for lo, hi, kills in crash_pieces(numbers, mine, self.settings.crash_retries):
                    error = None
                    if kills:
                        n = mine[(numbers[lo], numbers[lo])]
                        error = RowError(f"this row killed the worker process running it, also when run alone ({n}x): a "
                                         "crash in the task or a library it calls (a segfault), out of memory, or a "
                                         "device error that left the GPU unusable (the manifest's device_failures)",
                                         "worker_crash")
                    yield [(i, hi - lo)], RowBatch(batch.table.slice(lo, hi - lo), batch.rows.slice(lo, hi - lo)), error

    def _prepared(self, unit: dict[str, Any]) -> Iterator[tuple[Segments, RowBatch, Any]]:
        """The unit's batches (``_joined``), read and tokenized (rows that could not be read:
        None). GPU actors do it on a second thread, PREFETCH_BATCHES ahead, while the GPU
        computes; CPU actors in turn with the model, as their cores are busy with it (the second
        thread cost CPU actors 15% of their speed: 9,323 -> 8,077 rows/s on 1M rows)."""
        def prepared() -> Iterator[tuple[Segments, RowBatch, Any]]:
            for segments, batch in self._joined(unit):
                yield segments, batch, None if batch.problem is not None else self.runner.prepare_table(batch.table)

        yield from _ahead(prepared(), PREFETCH_BATCHES) if self.settings.prefetch else prepared()

    def _joined(self, unit: dict[str, Any]) -> Iterator[tuple[Segments, RowBatch]]:
        """The unit's rows in batches of up to ``batch_size`` rows, across its files: the small
        files of a packed unit (shards of 10 rows, say) make full batches, not one per file.
        ``segments``: (piece, rows) of each file in the batch, in order. Rows that could not be
        read come alone."""
        size = max(1, self.settings.batch_size)
        held: list[tuple[int, RowBatch]] = []
        count = 0

        def flush() -> Iterator[tuple[Segments, RowBatch]]:
            nonlocal held, count
            if len(held) == 1:
                yield [(held[0][0], count)], held[0][1]
            elif held:
                first = held[0][1].table
                assert first is not None
                table = pa.concat_tables([b.table.cast(first.schema) for _, b in held])  # type: ignore[union-attr]
                yield [(i, len(b.rows)) for i, b in held], RowBatch(table, pa.concat_arrays([b.rows for _, b in held]))
            held, count = [], 0

        for i, piece in enumerate(unit["pieces"]):
            for batch in self._read(piece):
                if batch.problem is not None:
                    yield from flush()
                    yield [(i, len(batch.rows))], batch
                    continue
                if count and count + len(batch.rows) > size:
                    yield from flush()
                held.append((i, batch))
                count += len(batch.rows)
                if count >= size:
                    yield from flush()
        yield from flush()

    def _report(self) -> WorkReport:
        return WorkReport(actor=self.where, ready_at=self.ready_at)

    def _send(self, report: WorkReport, stats: BatchStats, committed: list[tuple[str, int]]) -> pa.Table:
        report.rows, report.errors, report.error_kinds = stats.rows, stats.errors, dict(stats.error_kinds)
        report.tokens, report.padded_tokens = stats.tokens, stats.padded_tokens
        report.parts = [name for name, _ in committed]
        report.committed_rows = sum(n for _, n in committed)
        report.at = time.time()
        self.stopping = self.stopping or bool(self.call("stopping"))
        release_memory()  # about once a second: cheap next to a second of work
        report.peak_rss_mb = peak_rss_mb()
        report.rss_mb = psutil.Process().memory_info().rss / 2**20
        return report.to_table()


def unit_names(unit: dict[str, Any]) -> tuple[str, str]:
    """(key, description) of a unit: the key the coordinator knows it by (unique in a run: no two
    units share a first row), and how a message names it."""
    pieces = unit["pieces"]
    if not pieces:
        return f"{unit.get('part') or 'empty'}:", "no rows"
    head = pieces[0]
    first, last = head["ranges"][0][0], pieces[-1]["ranges"][-1][1] - 1
    more = f" and {len(pieces) - 1} more file(s)" if len(pieces) > 1 else ""
    if unit.get("part"):
        return f"{unit['part']}:{first}-{last}", f"the error rows of {unit['part']}"
    return (f"{head['file']}:{first}-{last}:{len(pieces)}",
            f"rows {first}-{head['ranges'][-1][1] - 1} of {head['file']}{more}")


def _ahead(items: Iterator[Any], depth: int) -> Iterator[Any]:
    """``items``, produced on a second thread up to ``depth`` ahead of the consumer; an exception
    there is raised here, and the thread ends when the consumer stops early."""
    q: queue.Queue = queue.Queue(maxsize=depth)
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
            for item in items:
                if not put(item):
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


def reset_peak_rss() -> None:
    """Count this process's peak RSS from now (Linux: writing 5 to clear_refs resets VmHWM). Ray
    may start an actor in a worker process that an earlier actor of the same Ray job used (every
    run_job of one Python process is one Ray job): its lifetime peak (ru_maxrss) would be that
    actor's model, not this one's."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
    except OSError:  # not Linux, or not allowed: the lifetime peak it is
        pass


def peak_rss_mb() -> float:
    """This process's peak RSS since ``reset_peak_rss`` (VmHWM), else over its lifetime."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
