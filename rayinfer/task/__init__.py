"""Tasks: the Task base class a plugin implements (``base``), running a task over batches
without Ray (``runner``), and the plugin registry (``registry``).

``from rayinfer.task import Task`` keeps working for plugin authors."""

from rayinfer.errors import RowError
from rayinfer.models.load import LoadContext
from rayinfer.task.base import Batch, InputColumn, ModelRequirement, Task, TaskOptions

__all__ = ["Batch", "InputColumn", "LoadContext", "ModelRequirement", "RowError", "Task", "TaskOptions"]
