"""The Python API the CLI is a thin layer over: ``plan_job`` validates, ``run_job`` runs.

    from rayinfer import plan_job, run_job
    plan = plan_job("jobs/classify.yaml")   # every check that needs neither Ray nor weights
    manifest = run_job("jobs/classify.yaml", ["options.top_k=1"])
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Callable, Mapping

from rayinfer.plan.job import Plan, plan_job
from rayinfer.spec import JobSpec
from rayinfer.task.registry import Registry


def run_job(
    spec: JobSpec | str | Path | Mapping[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    *,
    address: str | None = None,
    resume: bool = False,
    progress: bool | Callable[[dict[str, Any]], None] = False,
    registry: Registry | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Validate, then run on Ray (embedded unless ``address`` is given). Returns the manifest.

    ``progress``: True for rayinfer's progress line on stderr (a bar on a terminal, log lines
    otherwise), or a callable that receives a progress snapshot dict every few seconds.

    ``stop``: an event that, once set (by a signal handler, another thread), stops the run
    cleanly: the actors commit the rows they hold, then ``rayinfer.errors.Stopped`` is raised and
    a resume goes on from there."""
    if resume:
        overrides = [*overrides, "output.mode=resume"]
    plan = plan_job(spec, overrides, registry=registry)
    from rayinfer.run.driver import execute  # imports ray

    return execute(plan, address=address, progress=progress, stop=stop)


def retry_errors(
    out_dir: str | Path,
    overrides: list[str] | tuple[str, ...] = (),
    *,
    address: str | None = None,
    progress: bool | Callable[[dict[str, Any]], None] = False,
    registry: Registry | None = None,
    stop: threading.Event | None = None,
) -> dict[str, Any]:
    """Run again only the rows of the finished output ``out_dir`` whose ``error`` is set, with the
    job in its manifest plus ``overrides`` (e.g. a raised limit), replacing them in their parts.
    Returns the updated manifest (its ``retries`` list records this run)."""
    from rayinfer.run.retry import retry_errors as retry

    return retry(str(out_dir), overrides, address=address, progress=progress, stop=stop, registry=registry)


__all__ = ["Plan", "plan_job", "retry_errors", "run_job"]
