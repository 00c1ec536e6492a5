"""The pool actor: one model replica. It loads the task once and hands whole work units to the
unit loop (``rayinfer.run.unit``); only small reports travel back to the driver.

An actor whose model does not load (a missing file, weights torch refuses to unpickle, no CUDA
where Ray gave it a GPU) does not fail in its constructor: Ray would restart it into the same
failure, and print each attempt's traceback. It keeps the failure (with the full traceback in a
log file on its node) and raises it, one rayinfer error, on the first unit it is given.
"""

from __future__ import annotations

import logging
import os
import pickle
import time
from typing import Any, Iterator, NoReturn

import pyarrow as pa

from rayinfer.errors import RayInferError, RunFailed
from rayinfer.models.load import LoadContext, actor_context, device_report
from rayinfer.run.failures import exception_chain, log_traceback
from rayinfer.run.unit import UnitLoop, UnitSettings, reset_peak_rss
from rayinfer.task.base import Task
from rayinfer.task.device import DeviceFailure
from rayinfer.task.runner import TaskRunner

log = logging.getLogger("rayinfer")

DEVICE_FAILURE_EXIT = 75  # the exit status of an actor process ended by a sticky device error
LOAD_DEATHS_MAX = 3  # an actor whose processes died this often while loading the model ends the run


class TaskActor:
    """Ray Data's callable class: ``__call__`` gets one unit at a time (a one-row table)."""

    def __init__(self, task_cls: type[Task], options: dict[str, Any], context: LoadContext, runner: dict[str, Any],
                 settings: UnitSettings, coordinator: Any = None) -> None:
        import ray

        reset_peak_rss()  # this actor's peak, not an earlier actor's in the same worker process
        self.coordinator = coordinator
        self.failure: RayInferError | None = None
        runtime = ray.get_runtime_context()
        node = ray.util.get_node_ip_address()
        gpu_ids = [str(g) for g in ray.get_gpu_ids()]
        where = f"{runtime.get_node_id()[:12]}:{os.getpid()}"
        self.where, self.node, self.run_id = where, node, str(settings.provenance.get("run_id", "run"))
        if coordinator is not None:  # before the load: a process that dies in it is known by the next one
            died = self._call("loading", runtime.get_actor_id(), runtime.get_node_id(), os.getpid(), node)
            if died >= LOAD_DEATHS_MAX:  # Ray would start it again, forever: one line instead
                self.failure = RunFailed(
                    f"an actor's process died {died} times on {node} while it loaded the model (the lines above say "
                    f"how; most often Ray's memory monitor kills it): the run stops rather than load it again; "
                    f"{settings.memory_hint}")
                return
        try:
            context = actor_context(context, gpu_ids, node)  # device: auto follows the GPUs Ray gave it
            task = task_cls(task_cls.Options.model_validate(options), context)
            task.load()
            device = device_report(context) | (task.engine_report or {})
        except Exception as exc:
            self.failure = load_failure(exc, context, node, self.run_id)
            return
        call = self._call if coordinator is not None else None  # None: a local coordinator (outside a run)
        self.loop = UnitLoop(TaskRunner(task, **runner), settings, call, where, time.time())
        if coordinator is not None:
            self._call("register", runtime.get_actor_id(), runtime.current_actor, runtime.get_node_id(), where, gpu_ids,
                       device)

    def __call__(self, units: pa.Table) -> Iterator[pa.Table]:
        if self.failure is not None:
            raise self.failure
        try:
            for unit in units.to_pylist():
                yield from self.loop.run_unit(unit)
        except DeviceFailure as exc:
            self._end(exc)

    def _end(self, exc: DeviceFailure) -> NoReturn:
        """A sticky device error: this process can compute no more. Its traceback to a file, the
        coordinator told (for the manifest), then the process ends: Ray starts a new actor, and the
        unit runs again under the worker-crash rules (``rayinfer.run.coordinator``), which isolate
        a row that keeps causing it. The open part was dropped on the way out (the unit loop)."""
        trace = log_traceback(exc, f"{self.run_id}-device-{os.getpid()}", self.node)
        log.error("rayinfer: an actor on %s: %s; %s", self.node, exc, trace)
        if self.coordinator is not None:
            try:
                self._call("device_failure", self.where, f"{exc}; {trace}")
            except Exception:  # the run is ending anyway: the process still must
                pass
        os._exit(DEVICE_FAILURE_EXIT)

    def _call(self, method: str, *args: Any) -> Any:
        """Call the run's coordinator actor."""
        import ray

        return ray.get(getattr(self.coordinator, method).remote(*args))


def load_failure(exc: Exception, context: LoadContext, node: str, run_id: str) -> RayInferError:
    """One line for a model that failed to load: what, where, why, what to do, and the log file
    that holds the full traceback (on the actor's node)."""
    trace = log_traceback(exc, f"{run_id}-load-{os.getpid()}", node)
    pickled = any(isinstance(e, pickle.UnpicklingError) for e in exception_chain(exc))
    if isinstance(exc, RayInferError) and not pickled:
        return RunFailed(f"{exc} (an actor on {node}); {trace}")
    what = f"model {context.model!r}" + (f" with adapter {context.adapter!r}" if context.adapter else "")
    if pickled:
        why = ("its weights are a pickle file that torch will not load safely (it refuses to run code from it); "
               "convert them to safetensors where they come from, or use a model that ships .safetensors")
    else:
        why = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:300]}"
    return RunFailed(f"the {what} failed to load in an actor on {node}: {why}; {trace}")

