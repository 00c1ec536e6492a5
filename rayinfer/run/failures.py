"""What the user sees when a run fails inside Ray: Ray's exceptions mapped to rayinfer errors."""

from __future__ import annotations

import errno
import logging
import sys
from contextlib import contextmanager
from typing import Any, Iterator

from rayinfer.errors import RayInferError, RunError, RunFailed
from rayinfer.plan.job import Plan
from rayinfer.run.admission import actor_need, describe
from rayinfer.run.progress import WorkReport


def run_failure(exc: BaseException, run_id: str, out_dir: str) -> RayInferError:
    """What the user sees when a run fails inside Ray: one line (rayinfer's own message where an
    actor raised one, such as an unreadable row group), where the full traceback went, and that
    the committed parts are kept."""
    import traceback

    from rayinfer.models.catalog import home

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
        return RunFailed(f"{first_line(cause)}; {kept}; {where}")
    init = _actor_init_failure(exc)
    if init is not None:
        return RunFailed(f"{init}; {kept}; {where}")
    lost = _lost_worker(exc)
    if lost is not None:
        return PoolLost(f"the actor pool lost a worker that Ray could not bring back ({type(lost).__name__}: "
                        f"{first_line(lost)}); {kept}; {where}")
    inner = getattr(exc, "cause", None) or exc
    if isinstance(inner, OSError) and (inner.errno == errno.ENOSPC or "No space left on device" in str(inner)):
        return RunFailed(f"no space left on the device holding {out_dir} (or its temporary files); free space or "
                         f"choose another output.path; {kept}; {where}")
    return RunFailed(f"the run failed: {type(inner).__name__}: {first_line(inner)}; {kept}; {where}")


class PoolLost(RunFailed):
    """The pool lost a worker (its node died, it became unreachable) in a way Ray Data did not
    recover from by itself: ``execute`` goes on from the committed parts with a new pool.
    ``nodes``: the nodes alive when the pool started."""

    nodes: set[str] = set()


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


def first_line(exc: BaseException) -> str:
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
            return "an actor failed to start: " + (raised[-1] if raised else first_line(e))
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
