"""The Task base class: what a task plugin implements.

A task is split like a transformers Pipeline, at batch level because Ray's unit is a batch:

    preprocess(batch)        -> one encoded item per row (or a RowError for a bad row)
    forward(items)           -> one raw output per item (the only code touching the model)
    postprocess(outputs, batch) -> output columns

The framework (``rayinfer.runner.TaskRunner``) sorts encoded rows by ``length(item)``, cuts
them into micro-batches under a token budget, calls ``forward`` on each, restores the input
order and isolates rows that fail, so a task never needs to handle padding order or errors
of other rows. Heavy imports (torch, transformers) belong in ``load()`` or inside methods,
never at module level: ``rayinfer tasks`` must list tasks without importing torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from rayinfer.errors import RowError

Batch = dict[str, list[Any]]
"""Task inputs for a batch: input name -> one value per row."""


class TaskOptions(BaseModel):
    """Base of every task's ``Options``: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class InputColumn:
    """A column a task reads. ``dtype`` is checked against the Parquet schema before Ray starts."""

    description: str
    dtype: str = "string"  # "string", or any pyarrow type name such as "int64"
    allow_empty: bool = False  # a null value is always a row error; empty strings too unless allowed


@dataclass(frozen=True)
class LoadContext:
    """Where and how a task loads its model; built from the job spec by the framework."""

    model: str  # a local folder or a hub id (catalog names are already resolved)
    adapter: str | None = None
    merge_adapter: bool = True
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    trust_remote_code: bool = False
    num_threads: int | None = None  # intra-op threads; None leaves torch's default
    extra: dict[str, Any] = field(default_factory=dict)


class Task(ABC):
    """Base class of every task. Subclass it, set the class attributes, implement the methods."""

    name: ClassVar[str]
    """The name a job spec uses (``task: NAME``)."""

    description: ClassVar[str] = ""
    """One line shown by ``rayinfer tasks``."""

    inputs: ClassVar[dict[str, InputColumn]] = {"text": InputColumn("The text to process.")}
    """The task's input names; ``input.columns`` in the spec maps them to dataset columns."""

    cpu_batch_tokens: ClassVar[int | None] = None
    """The token budget per forward pass on CPU actors when the spec sets none (None: 2048, good
    for encoders; generation tasks set more, since a decode step costs about the same for many rows)."""

    class Options(TaskOptions):
        """The task's options (``options:`` in the spec). Every field needs a description."""

    def __init__(self, options: TaskOptions, context: LoadContext) -> None:
        self.options = options
        self.context = context

    @classmethod
    @abstractmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        """The output columns this task adds (the framework adds id, keep columns and ``error``)."""

    @classmethod
    def check_model_config(cls, config: dict[str, Any], options: TaskOptions) -> None:
        """Reject, before Ray starts, a model whose ``config.json`` cannot serve this task.

        Raise ``rayinfer.errors.ModelError`` with a message that says what fits instead.
        """

    @classmethod
    def adapter_task_types(cls, options: TaskOptions) -> set[str] | None:
        """PEFT ``task_type`` values an adapter may have for this task (None: any). An adapter
        without a task_type always passes."""
        return None

    @abstractmethod
    def load(self) -> None:
        """Load the model and tokenizer once per actor. Heavy imports go here."""

    @abstractmethod
    def preprocess(self, batch: Batch) -> list[Any]:
        """Encode each row. Return one item per row, or a ``RowError`` for a row that is bad."""

    def length(self, item: Any) -> int:
        """The cost of one encoded row in tokens, for micro-batching by token budget."""
        if isinstance(item, dict) and "input_ids" in item:
            return len(item["input_ids"])
        return 1

    @abstractmethod
    def forward(self, items: list[Any]) -> list[Any]:
        """Run the model on one micro-batch of encoded rows; return one raw output per row."""

    @abstractmethod
    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        """Turn raw outputs into output columns (one value per row, matching ``output_schema``)."""

    @classmethod
    def describe(cls) -> dict[str, Any]:
        """What ``rayinfer tasks show`` prints: inputs, options with descriptions, output schema."""
        options = []
        for fname, finfo in cls.Options.model_fields.items():
            default = None if finfo.is_required() else finfo.get_default(call_default_factory=True)
            options.append(
                {
                    "name": fname,
                    "type": _type_name(finfo.annotation),
                    "default": default,
                    "required": finfo.is_required(),
                    "description": finfo.description or "",
                }
            )
        try:
            schema = cls.output_schema(cls.Options())
            outputs = [{"name": f.name, "type": str(f.type)} for f in schema]
        except Exception:  # options without defaults: the schema needs real options
            outputs = []
        return {
            "name": cls.name,
            "description": cls.description,
            "inputs": {k: {"description": v.description, "dtype": v.dtype} for k, v in cls.inputs.items()},
            "options": options,
            "outputs": outputs + [{"name": "error", "type": "string"}],
        }


def _type_name(annotation: Any) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation)
    if text == "Literal":  # a Literal inside Optional and the like
        text = str(annotation)
    return text.replace("typing.", "")


__all__ = ["Batch", "InputColumn", "LoadContext", "RowError", "Task", "TaskOptions"]
