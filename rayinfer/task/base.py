"""The Task base class: what a task plugin implements.

A task is split like a transformers Pipeline, at batch level because Ray's unit is a batch:

    preprocess(batch)        -> one encoded item per row (or a RowError for a bad row)
    forward(items)           -> one raw output per item (the only code touching the model)
    postprocess(outputs, batch) -> output columns

The framework (``rayinfer.task.runner.TaskRunner``) sorts encoded rows by ``length(item)``, cuts
them into micro-batches under a token budget, calls ``forward`` on each, restores the input
order and isolates rows that fail, so a task never needs to handle padding order or errors
of other rows. Heavy imports (torch, transformers) belong in ``load()`` or inside methods,
never at module level: ``rayinfer tasks`` must list tasks without importing torch.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import pyarrow as pa
from pydantic import BaseModel, ConfigDict

from rayinfer.errors import ModelError, RowError
from rayinfer.models.load import LoadContext
from rayinfer.models.locate import ModelLocation

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
    optional: bool = False  # read when ``input.columns`` maps it or the input has a column of its name


@dataclass(frozen=True)
class ModelRequirement:
    """What model a task takes, declared on the class (``requires = ModelRequirement(...)``).

    With it the base class checks ``config.json`` before Ray starts (``check_model_config``) and
    loads tokenizer and model in the actor (``load``), so a task writes neither."""

    auto_class: str
    """The transformers Auto class ``load()`` uses, by name (no import at class definition),
    e.g. ``"AutoModelForSequenceClassification"``."""

    architectures: tuple[str, ...] = ()
    """Accepted endings of the config's ``architectures`` (e.g. ``("ForSequenceClassification",)``);
    empty: any. A config that names no architecture passes (it is checked at load time)."""

    what: str = ""
    """How the refusal names what fits, e.g. ``"a sequence-classification head (*ForSequenceClassification)"``."""

    hint: str = ""
    """A sentence added to the refusal, e.g. which other task serves the model given."""

    encoder_decoder: bool | None = None
    """False: encoder-decoders are refused; True: they are accepted whatever their architecture;
    None: only ``architectures`` decides."""

    head: tuple[str, str] | None = None
    """(weight-name fragment, what it is): refuse at load a checkpoint without those weights
    instead of running a randomly initialised head (``rayinfer.models.load_model``'s ``head``)."""

    adapter_task_types: frozenset[str] | None = None
    """PEFT ``task_type`` values an adapter may have (None: any)."""

    def check(self, task: str, config: dict[str, Any]) -> None:
        archs = config.get("architectures") or []
        encoder_decoder = bool(config.get("is_encoder_decoder"))
        if self.encoder_decoder is True and encoder_decoder:
            return
        fits = not (self.encoder_decoder is False and encoder_decoder) and (
            not archs or not self.architectures or any(a.endswith(self.architectures) for a in archs)
        )
        if not fits:
            found = ", ".join(archs) or config.get("model_type") or "unknown"
            if encoder_decoder and self.encoder_decoder is False:
                found += " (an encoder-decoder)"
            what = self.what or " or ".join(f"*{a}" for a in self.architectures)
            hint = f" {self.hint}" if self.hint else ""
            raise ModelError(f"{task} needs {what}, but the model is {found}.{hint}")


class Task(ABC):
    """Base class of every task. Subclass it, set the class attributes, implement the methods."""

    name: ClassVar[str]
    """The name a job spec uses (``task: NAME``)."""

    description: ClassVar[str] = ""
    """One line shown by ``rayinfer tasks``."""

    inputs: ClassVar[dict[str, InputColumn]] = {"text": InputColumn("The text to process.")}
    """The task's input names; ``input.columns`` in the spec maps them to dataset columns."""

    requires: ClassVar[ModelRequirement | None] = None
    """The model this task takes; with it, the base class's ``check_model_config`` and ``load``
    do the work. None: the task overrides both."""

    uses_tokenizer: ClassVar[bool] = True
    """The task tokenizes its inputs with the model's tokenizer (or the spec's ``tokenizer:``, which
    ``self.context.tokenizer`` names): a model without tokenizer files is refused before Ray starts."""

    max_length_option: ClassVar[str] = "max_length"
    """The option that caps input tokens (``load`` sets ``self.max_length`` from it and the model's
    limit); an option of that name is not required."""

    decodes: ClassVar[bool] = False
    """True for a task whose forward is a decode loop (generate, summarize). Its work is cut for
    decoding: on CPUs an actor takes a node's cores (unless ``runtime.num_cpus`` is set), and a
    unit is never smaller than a decode batch."""

    full_logits: ClassVar[bool] = False
    """True for a task that computes vocabulary logits for every token of a pass (perplexity): an
    actor's memory estimate (``rayinfer.models.memory``) then counts them."""

    schedules: ClassVar[bool] = False
    """True for a task whose ``forward`` takes all of a batch's encoded rows at once and cuts its
    own passes within ``self.batch_limits`` (continuous batching: generate and summarize keep a
    decode batch full as rows end). Otherwise the runner cuts micro-batches for ``forward``."""

    streams: bool = False
    """Set (in ``load``) by a ``schedules`` task whose ``forward_stream`` takes a unit's batches as one
    stream (generate: rows join its decode loop as slots free, no drain between batches)."""

    batch_limits: tuple[int, int | None] = (2048, None)
    """(tokens, rows) a pass may hold: the runner's ``max_batch_tokens`` and ``max_batch_rows``,
    set when a runner takes the task. A ``schedules`` task keeps its passes within them."""

    engines: ClassVar[tuple[str, ...]] = ("torch",)
    """The ``runtime.engine`` values the task runs on (``self.context.engine`` says which one the
    actor loads for); a spec asking another is refused before Ray starts."""

    engine_report: dict[str, Any] | None = None
    """Set in ``load`` by a task on another engine than torch: what the manifest's ``actor_devices``
    says of it for this actor (e.g. whether it exported the model or read the export)."""

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

        The default checks ``requires``. An override raises ``rayinfer.errors.ModelError`` with a
        message that says what fits instead.
        """
        if cls.requires is not None:
            cls.requires.check(cls.name, config)

    @classmethod
    def options_for_model(cls, options: TaskOptions, model: ModelLocation) -> TaskOptions:
        """The options completed from the model's files, before Ray starts (``embed`` reads the size
        of the model's vectors, which its output schema needs); raise ``SpecError`` or
        ``ModelError`` for options the model cannot serve. The default returns them as given."""
        return options

    @classmethod
    def adapter_task_types(cls, options: TaskOptions) -> set[str] | None:
        """PEFT ``task_type`` values an adapter may have for this task (None: any). An adapter
        without a task_type always passes. The default reads ``requires``."""
        types = cls.requires.adapter_task_types if cls.requires is not None else None
        return set(types) if types is not None else None

    def load(self) -> None:
        """Load the model and tokenizer once per actor. Heavy imports go here.

        The default, for tasks that declare ``requires``: ``self.tokenizer`` and ``self.model``
        (``requires.auto_class`` through ``rayinfer.models.load_model``: device, dtype, adapter,
        eval mode, head check), eos as pad token where the tokenizer has none, and
        ``self.max_length`` (the ``max_length_option`` option capped by the model's limit). A
        task with more to set up overrides this and calls ``super().load()`` first."""
        if self.requires is None:
            raise NotImplementedError(f"task {self.name!r} declares no `requires`, so it must implement load()")
        import transformers

        from rayinfer.models.load import load_model, load_tokenizer
        from rayinfer.text import ensure_pad_token, max_input_length

        self.tokenizer = load_tokenizer(self.context)
        auto_class = getattr(transformers, self.auto_class())
        self.model = load_model(self.context, auto_class, head=self.requires.head)
        ensure_pad_token(self.tokenizer, self.model)
        requested = getattr(self.options, self.max_length_option, None)
        self.max_length = max_input_length(self.tokenizer, self.model, requested)

    def auto_class(self) -> str:
        """The Auto class ``load`` uses: ``requires.auto_class`` unless a task picks by model."""
        assert self.requires is not None
        return self.requires.auto_class

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
        """Run the model on one micro-batch of encoded rows; return one raw output per row (or a
        ``RowError`` for a row whose result is an error: it becomes that row's error, and
        ``postprocess`` never sees it)."""

    def forward_stream(self, batches: Iterator[list[tuple[Any, Any]]]) -> Iterator[tuple[Any, Any]]:
        """``forward`` for a task that ``streams``: ``batches`` gives each batch's encoded rows as
        (key, item) pairs, longest first; yield (key, output) for every row, in any order, as each is
        done, taking the next batch from ``batches`` only when it has room for its rows (the runner
        commits a batch once all its rows are back). A failure is handled by the runner: it runs the
        rows in flight through ``forward``."""
        raise NotImplementedError(f"task {self.name!r} sets streams but has no forward_stream")

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
        try:  # the defaults, unvalidated: a required option (zero-shot labels) has no default
            schema = cls.output_schema(cls.Options.model_construct())
            outputs = [{"name": f.name, "type": str(f.type)} for f in schema]
        except Exception:  # a schema that needs the real options
            outputs = []
        return {
            "name": cls.name,
            "description": cls.description,
            "inputs": {k: {"description": v.description, "dtype": v.dtype, "optional": v.optional}
                       for k, v in cls.inputs.items()},
            "options": options,
            "outputs": outputs + [{"name": "error", "type": "string"}],
            "engines": list(cls.engines),
        }


def _type_name(annotation: Any) -> str:
    from typing import Literal, get_args, get_origin

    if get_origin(annotation) is Literal:
        return " | ".join(repr(a) for a in get_args(annotation))
    text = getattr(annotation, "__name__", None) or str(annotation)
    if text == "Literal":  # a Literal inside Optional and the like
        text = str(annotation)
    return text.replace("typing.", "")


__all__ = ["Batch", "InputColumn", "LoadContext", "ModelRequirement", "RowError", "Task", "TaskOptions"]
