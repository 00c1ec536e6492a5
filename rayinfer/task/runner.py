"""Running a task over one batch, without Ray: the same code serves actors, tests and plugin authors.

What the runner guarantees for a batch of n rows:
- exactly n output rows, in input order;
- a row with a null or empty input, or one the task rejects, gets a message in ``error`` and
  null outputs, while the other rows of its batch are still processed: a failing call is
  split in halves until the failing rows are found (so one bad row costs ~2 log2(n) calls);
- rows are sorted by token length and cut into micro-batches under a token budget
  (rows x longest row <= ``max_batch_tokens``), so short rows are not padded to long ones; a
  task that ``schedules`` its own passes (continuous batching) gets them all in one call.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import pyarrow as pa

from rayinfer.errors import ERROR_COL, RowError
from rayinfer.task.base import Batch, Task
from rayinfer.task.device import one_row_out_of_memory, triage
from rayinfer.text import micro_batches

log = logging.getLogger("rayinfer")




@dataclass
class BatchStats:
    rows: int = 0
    errors: int = 0
    error_kinds: Counter = field(default_factory=Counter)
    tokens: int = 0  # real tokens of the rows that reached forward
    padded_tokens: int = 0  # tokens forward computed, padding included
    forward_calls: int = 0

    def reset(self) -> None:
        self.__dict__.update(BatchStats().__dict__)


def output_schema(task_cls: type[Task], options: Any, input_schema: pa.Schema, id_column: str, keep: Sequence[str]) -> pa.Schema:
    """The schema of every output part: id, keep columns, the task's outputs, error."""
    fields = [input_schema.field(id_column)] + [input_schema.field(k) for k in keep if k != id_column]
    task_fields = list(task_cls.output_schema(options))
    taken = {f.name for f in fields}
    clash = [f.name for f in task_fields if f.name in taken or f.name == ERROR_COL]
    if clash:
        from rayinfer.errors import SpecError

        raise SpecError(
            f"input.keep/id_column {clash} clash with the {task_cls.name!r} task's output columns; rename them"
        )
    return pa.schema(fields + task_fields + [pa.field(ERROR_COL, pa.string())])


@dataclass
class Prepared:
    """A batch checked and encoded, waiting for the model (``TaskRunner.prepare``)."""

    batch: Batch
    n: int
    errors: list[RowError | None]
    encoded: dict[int, Any]
    lengths: dict[int, int]


class TaskRunner:
    """Runs a loaded task on batches of task inputs (``run``) or of dataset rows (``prepare_table`` then
    ``complete_table``, as the unit loop does)."""

    def __init__(
        self,
        task: Task,
        *,
        column_map: dict[str, str] | None = None,
        id_column: str = "id",
        keep: Sequence[str] = (),
        max_batch_tokens: int = 2048,
        max_batch_rows: int | None = None,
    ) -> None:
        self.task = task
        given = column_map or {}
        self.column_map = {name: given.get(name, name) for name, spec in task.inputs.items()
                           if not spec.optional or name in given}  # an optional input: read only where mapped
        self.id_column = id_column
        self.keep = [k for k in keep if k != id_column]
        self.max_batch_tokens = max_batch_tokens
        self.max_batch_rows = max_batch_rows  # set for decoding tasks: rows per decode loop
        self.task_schema = type(task).output_schema(task.options)
        task.batch_limits = (max_batch_tokens, max_batch_rows)

    # -- the core: task inputs in, output columns + errors out ------------------------------

    def run(self, batch: Batch, stats: BatchStats | None = None) -> tuple[dict[str, list[Any]], list[RowError | None]]:
        return self.complete(self.prepare(batch), stats)

    def prepare(self, batch: Batch) -> Prepared:
        """Check and encode a batch (no model call): ``complete`` runs the model on it. Actors call
        this on a second thread, so tokenizing the next batch overlaps the model on this one."""
        n = len(next(iter(batch.values()))) if batch else 0
        errors: list[RowError | None] = [None] * n
        self._check_inputs(batch, errors)
        valid = [i for i in range(n) if errors[i] is None]
        encoded: dict[int, Any] = {}
        for i, item in self._isolate(lambda idx: self.task.preprocess(_take(batch, idx)), valid, errors, "preprocess"):
            if isinstance(item, RowError):
                errors[i] = item
            else:
                encoded[i] = item
        lengths = {i: int(self.task.length(item)) for i, item in encoded.items()}
        return Prepared(batch, n, errors, encoded, lengths)

    def complete(self, prepared: Prepared, stats: BatchStats | None = None) -> tuple[dict[str, list[Any]], list[RowError | None]]:
        with _inference_mode():
            return self._complete(prepared, stats if stats is not None else BatchStats())

    def _complete(self, p: Prepared, stats: BatchStats) -> tuple[dict[str, list[Any]], list[RowError | None]]:
        encoded, lengths = p.encoded, p.lengths
        order = sorted(encoded, key=lambda i: -lengths[i])
        outputs: dict[int, Any] = {}
        if self.task.schedules:  # the task cuts its own passes: no padding across its rows
            chunks = [order] if order else []
        else:
            chunks = micro_batches(order, lengths, self.max_batch_tokens, self.max_batch_rows)
        for chunk in chunks:
            self._count(chunk, lengths, stats)
            self._forward(p, chunk, outputs)

        return self._finish(p, outputs, stats)

    def _finish(self, p: Prepared, outputs: dict[int, Any], stats: BatchStats) -> tuple[dict[str, list[Any]], list[RowError | None]]:
        """A batch's output columns from its rows' forward outputs: postprocess, rows in order."""
        batch, n, errors = p.batch, p.n, p.errors
        names = [f.name for f in self.task_schema]

        def post(idx: list[int]) -> list[tuple[Any, ...]]:
            cols = self.task.postprocess([outputs[j] for j in idx], _take(batch, idx))
            missing = [name for name in names if name not in cols]
            if missing:
                raise TypeError(f"task {self.task.name!r} postprocess returned no column(s) {missing}")
            return list(zip(*(cols[name] for name in names)))

        done = sorted(outputs)
        rows = self._isolate(post, done, errors, "postprocess")
        if len(rows) == n:  # the common case: every row has its outputs, in order
            columns = {name: list(col) for name, col in zip(names, zip(*(r for _, r in rows)))} if n else {name: [] for name in names}
        else:
            by_row = dict(rows)
            empty = (None,) * len(names)
            columns = {name: [by_row.get(i, empty)[j] for i in range(n)] for j, name in enumerate(names)}

        stats.rows += n
        for e in errors:
            if e is not None:
                stats.errors += 1
                stats.error_kinds[e.kind] += 1
        return columns, errors

    def _count(self, chunk: list[int], lengths: dict[int, int], stats: BatchStats) -> None:
        stats.forward_calls += 1
        stats.tokens += sum(lengths[i] for i in chunk)
        longest = max(lengths[i] for i in chunk)
        stats.padded_tokens += sum(lengths[i] for i in chunk) if self.task.schedules else len(chunk) * longest

    def _forward(self, p: Prepared, rows: list[int], outputs: dict[int, Any]) -> None:
        """``forward`` on rows of ``p``, a failing call cut in halves to its rows (``_isolate``)."""
        for i, out in self._isolate(lambda idx: self.task.forward([p.encoded[j] for j in idx]), rows, p.errors, "forward"):
            if isinstance(out, RowError):  # a row whose result is an error (e.g. constraint_unmet)
                p.errors[i] = out
            else:
                outputs[i] = out

    def _check_inputs(self, batch: Batch, errors: list[RowError | None]) -> None:
        for name, spec in self.task.inputs.items():
            if spec.optional and batch.get(name) is None:
                continue
            values = batch[name]
            column = self.column_map.get(name, name)
            label = f"input {name!r}" + (f" (column {column!r})" if column != name else "")
            for i, v in enumerate(values):
                if errors[i] is not None:
                    continue
                if v is None:
                    errors[i] = RowError(f"{label} is null", "null_input")
                elif isinstance(v, str) and not spec.allow_empty and not v.strip():
                    errors[i] = RowError(f"{label} is empty", "empty_input")

    def _isolate(
        self,
        fn: Callable[[list[int]], Sequence[Any]],
        idx: list[int],
        errors: list[RowError | None],
        stage: str,
    ) -> list[tuple[int, Any]]:
        """Call ``fn`` on rows ``idx``; on failure split in halves until the bad rows are found. An
        out-of-memory is halved too; a sticky device error is not (every later call would fail):
        it is raised as DeviceFailure, for the actor to end (``rayinfer.task.device``)."""
        if not idx:
            return []
        try:
            result = fn(idx)
        except Exception as exc:
            oom = triage(exc, stage)
            if len(idx) == 1:
                if isinstance(exc, RowError):
                    errors[idx[0]] = exc
                elif oom:
                    log.warning("rayinfer: %s ran out of memory on one row: %s", stage, exc)
                    errors[idx[0]] = one_row_out_of_memory(exc, stage)
                else:
                    log.warning("rayinfer: %s failed on one row: %s", stage, exc, exc_info=log.isEnabledFor(logging.DEBUG))
                    errors[idx[0]] = RowError(f"{stage} failed: {type(exc).__name__}: {exc}", stage)
                return []
            mid = len(idx) // 2
            return self._isolate(fn, idx[:mid], errors, stage) + self._isolate(fn, idx[mid:], errors, stage)
        if len(result) != len(idx):
            raise RuntimeError(
                f"task {self.task.name!r} {stage} returned {len(result)} items for {len(idx)} rows"
            )
        return list(zip(idx, result))

    # -- dataset rows in, output table out --------------------------------------------------

    def prepare_table(self, table: pa.Table) -> Prepared:
        return self.prepare({name: table.column(col).to_pylist() for name, col in self.column_map.items()})

    def error_table(self, n: int, schema: pa.Schema, error: RowError, stats: BatchStats | None = None,
                    table: pa.Table | None = None) -> pa.Table:
        """Output for ``n`` rows that all get ``error`` and null outputs: rows that could not even be
        read (no ``table``: their id is null too), or the rows of ``table`` that the task cannot run
        (a row that kills its worker: id and keep columns come from ``table``)."""
        if stats is not None:
            stats.rows += n
            stats.errors += n
            stats.error_kinds[error.kind] += n
        columns = {f.name: pa.nulls(n, f.type) for f in schema if f.name != ERROR_COL}
        if table is not None:
            for name in [self.id_column, *self.keep]:
                columns[name] = table.column(name)
        return pa.table({**columns, ERROR_COL: pa.array([error.message] * n, pa.string())}, schema=schema)

    def complete_table(self, table: pa.Table, prepared: Prepared, schema: pa.Schema, stats: BatchStats | None = None) -> pa.Table:
        return self._table(table, *self.complete(prepared, stats), schema)

    def _table(self, table: pa.Table, columns: dict[str, list[Any]], errors: list[RowError | None], schema: pa.Schema) -> pa.Table:
        data: dict[str, Any] = {self.id_column: table.column(self.id_column)}
        for k in self.keep:
            data[k] = table.column(k)
        for f in self.task_schema:
            data[f.name] = pa.array(columns[f.name], type=f.type)
        data[ERROR_COL] = pa.array([e.message if e else None for e in errors], type=pa.string())
        return pa.table(data, schema=schema)

    # -- batches as one stream (a task that ``streams``: rows join its decode loop as slots free) --

    @property
    def streams(self) -> bool:
        return self.task.streams

    def stream_tables(self, entries: Iterable[tuple[Any, tuple[pa.Table, Prepared] | None]], schema: pa.Schema,
                      stats: BatchStats) -> Iterator[tuple[Any, pa.Table | None]]:
        """``complete_table`` for batch after batch, the task's ``forward_stream`` taking the next
        batch's rows while the last ones' are still in flight. ``entries``: (tag, (table, prepared))
        per batch, or (tag, None) for one that has no rows for the model (passed through as None).
        Yields (tag, output table) in the entries' order, each batch once all its rows are done.
        If the stream fails, the rows in flight run batch by batch through ``forward``, a failing
        call cut in halves to its rows as ``complete`` does (a sticky device error is raised), and
        the stream goes on with the batches after them."""
        source = iter(entries)
        queue: deque[_InFlight] = deque()

        def feed() -> Iterator[list[tuple[_InFlight, Any]]]:
            while True:
                try:
                    tag, payload = next(source)
                except StopIteration:
                    return
                except Exception as exc:  # reading or tokenizing failed: not the model's doing
                    raise _SourceFailed() from exc
                f = _InFlight(tag, *(payload or (None, None)))
                queue.append(f)
                if f.prepared is not None and f.prepared.encoded:
                    p = f.prepared
                    order = sorted(p.encoded, key=lambda i: -p.lengths[i])
                    f.left = set(order)
                    self._count(order, p.lengths, stats)
                    yield [((f, i), p.encoded[i]) for i in order]

        def done() -> Iterator[tuple[Any, pa.Table | None]]:
            while queue and not queue[0].left:
                f = queue.popleft()
                if f.prepared is None:
                    yield f.tag, None
                else:
                    yield f.tag, self._table(f.table, *self._finish(f.prepared, f.outputs, stats), schema)

        with _inference_mode():
            results = self.task.forward_stream(feed())
            while True:
                try:
                    (f, i), out = next(results)
                except StopIteration:
                    break
                except _SourceFailed as exc:
                    raise exc.__cause__ from None  # type: ignore[misc]
                except Exception as exc:
                    self._stream_failed(exc, queue)
                    results = self.task.forward_stream(feed())
                else:
                    f.left.discard(i)
                    if isinstance(out, RowError):
                        f.prepared.errors[i] = out
                    else:
                        f.outputs[i] = out
                yield from done()
        yield from done()

    def _stream_failed(self, exc: Exception, queue: deque[_InFlight]) -> None:
        """The stream failed: its rows in flight, batch by batch, through ``forward`` and ``_isolate``."""
        triage(exc, "forward")
        log.warning("rayinfer: the decode stream failed (%s: %s); running its %d rows in flight batch by batch",
                    type(exc).__name__, exc, sum(len(f.left) for f in queue))
        for f in queue:
            if f.left and f.prepared is not None:
                self._forward(f.prepared, sorted(f.left, key=lambda i: -f.prepared.lengths[i]), f.outputs)
                f.left = set()


@dataclass(eq=False)
class _InFlight:
    """A batch in ``stream_tables``: its rows' outputs as they come, and which rows are still out."""

    tag: Any
    table: pa.Table | None
    prepared: Prepared | None
    outputs: dict[int, Any] = field(default_factory=dict)
    left: set[int] = field(default_factory=set)


class _SourceFailed(Exception):
    """Reading the next batch failed inside a stream (raised again as itself, not as the model's)."""


def _inference_mode() -> Any:
    """torch.inference_mode when the task uses torch (it has been imported by load()), else nothing."""
    import contextlib
    import sys

    torch = sys.modules.get("torch")
    return torch.inference_mode() if torch is not None else contextlib.nullcontext()


def _take(batch: Batch, idx: list[int]) -> Batch:
    return {k: [v[i] for i in idx] for k, v in batch.items()}
