"""What the user sees when a run fails inside Ray: one line, never a Ray traceback.

Ray's exceptions are mapped to rayinfer errors by their types and fields, never by reading
their message text: the RayInferError an actor raised (Ray keeps the original as ``cause``), an
actor that could not start (``RayActorError.actor_init_failed``), a worker or node that is gone,
a full disk (``errno``), else the original exception's type and first line. The full traceback
goes to a log file the line names.
"""

from __future__ import annotations

import errno
import logging
import sys
import traceback
from contextlib import contextmanager
from typing import Any, Iterator

from rayinfer.errors import RayInferError, RunError, RunFailed
from rayinfer.models.catalog import home
from rayinfer.plan.job import Plan
from rayinfer.run.admission import actor_need, describe
from rayinfer.run.progress import WorkReport


class PoolLost(RunFailed):
    """The pool lost a worker (its node died, it became unreachable) in a way Ray Data did not
    recover from by itself: ``execute`` goes on from the committed parts with a new pool.
    ``nodes``: the nodes alive when the pool started."""

    nodes: set[str] = set()

    def __init__(self, reason: str, rest: str = "") -> None:
        super().__init__(f"{reason}; {rest}" if rest else reason, rest)
        self.reason = reason


def run_failure(exc: BaseException, run_id: str, out_dir: str) -> RayInferError:
    """The one line for a run that failed inside Ray: what failed, that the committed parts are
    kept, and where the full traceback went."""
    import ray.exceptions as rex

    where = log_traceback(exc, run_id)
    kept = f"committed parts stay in {out_dir} (--resume goes on from them)"
    chain = list(exception_chain(exc))
    ours = next((e for e in chain if isinstance(e, RayInferError) and not isinstance(e, rex.RayError)), None)
    if ours is not None:  # raised in an actor (Ray keeps it as the task error's cause) or here
        return RunFailed(f"{str(ours).strip()}; {kept}; Ray's {where}")
    if any(isinstance(e, rex.RayActorError) and e.actor_init_failed for e in chain):
        return RunFailed("an actor failed to start before rayinfer's code ran in it (a package or task plugin "
                         f"missing on a node, or a constructor argument that does not unpickle there); {kept}; {where}")
    lost = (rex.RayActorError, rex.WorkerCrashedError, rex.NodeDiedError, rex.ObjectLostError)
    gone = next((e for e in chain if isinstance(e, lost)), None)
    if gone is not None:
        return PoolLost(f"the actor pool lost a worker that Ray could not bring back ({type(gone).__name__})",
                        f"{kept}; {where}")
    if any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain):
        return RunFailed(f"no space left on the device holding {out_dir} (or its temporary files); free space or "
                         f"choose another output.path; {kept}; {where}")
    origin = next((e for e in chain if not isinstance(e, rex.RayError)), exc)  # the exception the worker raised
    return RunFailed(f"the run failed: {type(origin).__name__}: {first_line(origin)}; {kept}; {where}")


def worker_exits(processes: set[tuple[str, int]]) -> dict[tuple[str, int], str]:
    """How Ray says these worker processes ended, by (node id, pid): ``NODE_OUT_OF_MEMORY`` (its
    memory monitor killed it), ``SYSTEM_ERROR`` (killed or crashed), ``USER_ERROR``... Processes
    still alive, or not in the table yet, are left out.

    Read from the GCS's worker table (typed exit fields, not Ray's message text). Ray's public
    state API (``ray.util.state.list_workers``) needs the dashboard, which the embedded Ray does
    not start, so this uses the accessor ``ray.nodes()`` itself uses; where that fails (another
    Ray version), the answer is empty and rayinfer's lines say "not known"."""
    if not processes:
        return {}
    try:
        from ray._private.state import state
        from ray.core.generated import common_pb2, gcs_pb2

        table = state._connect_and_get_accessor().get_worker_table()
        out = {}
        for raw in table:
            worker = gcs_pb2.WorkerTableData.FromString(raw)
            key = (worker.worker_address.node_id.hex(), int(worker.pid))
            if key in processes and not worker.is_alive:
                out[key] = common_pb2.WorkerExitType.Name(worker.exit_type)
        return out
    except Exception as exc:  # noqa: BLE001 - a private accessor: any failure means "not known"
        logging.getLogger("rayinfer").debug("rayinfer: reading Ray's worker table: %s", exc)
        return {}


def log_traceback(exc: BaseException, name: str, node: str = "") -> str:
    """Write ``exc``'s full traceback to rayinfer's log folder (on this node) as NAME.log; returns
    how the user's line names it."""
    log_file = home() / "logs" / f"{name}.log"
    try:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        log_file.write_text("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)), encoding="utf-8")
    except OSError as err:
        return f"(could not write the traceback to {log_file}: {err})"
    return f"full traceback in {log_file}" + (f" on {node}" if node else "")


def exception_chain(exc: BaseException) -> Iterator[BaseException]:
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
        stack += [e.__context__, e.__cause__, cause if isinstance(cause, BaseException) else None]


def first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [""])[0][:300]


def _is_pool_start_timeout(exc: BaseException | None) -> bool:
    """Ray Data's timeout on starting the pool's first actors: the only ``GetTimeoutError`` a
    run's dataset raises (rayinfer sets ``wait_for_min_actors_s``)."""
    import ray.exceptions as rex

    return isinstance(exc, rex.GetTimeoutError)


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


def reports(ds: Any, plan: Plan, pool_min: int) -> Iterator[WorkReport]:
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
