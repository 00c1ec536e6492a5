"""rayinfer: plugin-based offline batch inference with Hugging Face models on Ray."""

from rayinfer.api import Plan, plan_job, retry_errors, run_job  # noqa: E402
from rayinfer.errors import RayInferError, RowError  # noqa: E402
from rayinfer.hookspecs import hookimpl  # noqa: E402
from rayinfer.models.load import LoadContext  # noqa: E402
from rayinfer.spec import JobSpec, load_spec  # noqa: E402
from rayinfer.task.base import Batch, InputColumn, ModelRequirement, Task, TaskOptions  # noqa: E402
from rayinfer.task.runner import TaskRunner  # noqa: E402
from rayinfer.version import __version__

__all__ = [
    "Batch",
    "InputColumn",
    "JobSpec",
    "LoadContext",
    "ModelRequirement",
    "Plan",
    "RayInferError",
    "RowError",
    "Task",
    "TaskOptions",
    "TaskRunner",
    "__version__",
    "hookimpl",
    "load_spec",
    "plan_job",
    "retry_errors",
    "run_job",
]
