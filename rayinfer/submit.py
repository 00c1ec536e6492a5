"""Submitting jobs to a Ray cluster through the Ray Jobs API (``JobSubmissionClient``).

The job's driver runs on the cluster as ``python -m rayinfer run --spec-json ... --address auto``:
the spec travels in the entrypoint (it is small), the working directory and any extra pip
packages (e.g. a task plugin) travel in the runtime environment. Token authentication is handled
by Ray's client itself, which reads ``RAY_AUTH_TOKEN`` / ``RAY_AUTH_TOKEN_PATH`` / the default
token file exactly as the ``ray`` CLI does. Nothing here imports ray at module level.
"""

from __future__ import annotations

import json
import shlex
import time
from pathlib import Path
from typing import Any, Callable

from rayinfer.errors import RayInferError, RunError

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 3, "STOPPED": 130}
# never uploaded with the working directory: environments, outputs, caches, VCS
AGENT_WAIT_S = 120  # how long to wait for a just-started head node's job agent (over 60 s on a busy 2-core machine)

EXCLUDES = [".venv", "venv", ".git", "out", "__pycache__", ".pytest_cache", ".hypothesis", "*.egg-info", "build"]


class ClusterError(RayInferError):
    """The cluster cannot be reached, or refused the request."""


def client(address: str) -> Any:
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address)
    except Exception as exc:  # ConnectionError, auth errors, bad addresses
        if "authentication token" in str(exc).lower():  # Ray's text: a paragraph of advice after the reason
            raise ClusterError(
                f"the Ray job server at {address!r} refused this client's authentication token: give the cluster's "
                "token in RAY_AUTH_TOKEN (or the file RAY_AUTH_TOKEN_PATH names; `ray get-auth-token` on the head "
                "prints it)") from None
        raise ClusterError(f"cannot reach the Ray job server at {address!r}: {_first_line(exc)}") from None


def _first_line(exc: Exception) -> str:
    """An exception's message up to its first blank line, on one line."""
    return " ".join(str(exc).split("\n\n")[0].split())


def submit(
    job: str | Path,
    overrides: list[str],
    address: str,
    working_dir: str | Path | None = ".",
    pip: list[str] | None = None,
    submission_id: str | None = None,
) -> str:
    """Check the spec (its keys, task and options: paths are checked on the cluster), submit it,
    and return the submission id."""
    from rayinfer.errors import SpecError
    from rayinfer.io.location import refuse_credentials
    from rayinfer.plan.job import validate_options
    from rayinfer.spec import load_spec
    from rayinfer.task.registry import load_registry

    spec = load_spec(job, overrides)
    for what, path in (("input.path", spec.input.path), ("output.path", spec.output.path)):
        refuse_credentials(path, what, SpecError)  # the spec travels in the job's entrypoint, shown by Ray
    validate_options(load_registry().get(spec.task), spec)

    # `rayinfer stop` (Ray's stop_job) sends the driver SIGTERM, and SIGKILL 3 s later by default:
    # leave the actors time to commit the rows they hold (runtime.stop_timeout_s), and the driver
    # time to say how far it got
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "RAY_JOB_STOP_WAIT_TIME_S": str(spec.runtime.stop_timeout_s + 15)}
    runtime_env: dict[str, Any] = {"env_vars": env_vars}
    if working_dir is not None:
        runtime_env["working_dir"] = str(working_dir)
        runtime_env["excludes"] = EXCLUDES
    if pip:
        runtime_env["pip"] = list(pip)
    entrypoint = "python -m rayinfer run --address auto --spec-json " + shlex.quote(json.dumps(spec.to_dict()))
    jobs = client(address)
    deadline = time.monotonic() + AGENT_WAIT_S
    while True:
        try:
            return jobs.submit_job(
                entrypoint=entrypoint,
                runtime_env=runtime_env,
                submission_id=submission_id,
                metadata={"rayinfer_task": spec.task, "rayinfer_model": spec.model},
            )
        except RayInferError:
            raise
        except Exception as exc:
            # a head node that has just started answers before its job agent is up
            if "No available agent" in str(exc) and time.monotonic() < deadline:
                time.sleep(2)
                continue
            raise ClusterError(f"the cluster at {address!r} refused the job: {exc}") from None


def status(address: str, submission_id: str) -> dict[str, Any]:
    try:
        info = client(address).get_job_info(submission_id)
    except RayInferError:
        raise
    except Exception as exc:
        raise ClusterError(f"no job {submission_id!r} on {address!r}: {exc}") from None
    return {
        "submission_id": info.submission_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message,
        "entrypoint": info.entrypoint,
        "start_time": info.start_time,
        "end_time": info.end_time,
        "metadata": info.metadata,
    }


def logs(address: str, submission_id: str) -> str:
    try:
        return client(address).get_job_logs(submission_id)
    except Exception as exc:
        raise ClusterError(f"cannot read the logs of {submission_id!r}: {exc}") from None


def follow(address: str, submission_id: str, out: Callable[[str], None], poll_s: float = 1.0) -> str:
    """Hand the job's log to ``out`` as it grows (streamed by the job server) until the job
    ends; return its final status."""
    import asyncio

    jobs = client(address)

    async def tail() -> None:
        async for text in jobs.tail_job_logs(submission_id):
            out(text)

    try:
        asyncio.run(tail())
    except RuntimeError as exc:  # the job does not exist, or the connection broke before it ended
        raise ClusterError(f"cannot follow the log of {submission_id!r}: {exc}") from None
    while (state := status(address, submission_id)["status"]) not in TERMINAL:  # the stream ends as the job does
        time.sleep(poll_s)
    return state


def stop(address: str, submission_id: str) -> bool:
    try:
        return bool(client(address).stop_job(submission_id))
    except Exception as exc:
        raise ClusterError(f"cannot stop {submission_id!r}: {exc}") from None


def list_jobs(address: str) -> list[dict[str, Any]]:
    try:
        jobs = client(address).list_jobs()
    except RayInferError:
        raise
    except Exception as exc:
        raise ClusterError(f"cannot list the jobs on {address!r}: {exc}") from None
    rows = []
    for j in jobs:
        if not j.submission_id:
            continue  # drivers not submitted through the Jobs API
        rows.append({
            "submission_id": j.submission_id,
            "status": str(j.status.value if hasattr(j.status, "value") else j.status),
            "task": (j.metadata or {}).get("rayinfer_task", ""),
            "start_time": j.start_time,
        })
    return sorted(rows, key=lambda r: r["start_time"] or 0)


def wait_exit_code(state: str) -> int:
    if state not in EXIT_CODES:
        raise RunError(f"job ended in an unknown state {state!r}")
    return EXIT_CODES[state]
