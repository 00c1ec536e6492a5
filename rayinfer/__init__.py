"""rayinfer: plugin-based offline batch inference with Hugging Face models on Ray."""

from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("rayinfer")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

from rayinfer.errors import RayInferError, RowError  # noqa: E402
from rayinfer.hookspecs import hookimpl  # noqa: E402
from rayinfer.task import Batch, InputColumn, LoadContext, ModelRequirement, Task, TaskOptions  # noqa: E402
from rayinfer.runner import TaskRunner  # noqa: E402
from rayinfer.spec import JobSpec, load_spec  # noqa: E402
from rayinfer.api import Plan, plan_job, retry_errors, run_job  # noqa: E402

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
