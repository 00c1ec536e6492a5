"""The plan: a job spec resolved and checked, before Ray starts or any weight loads.

``plan_job`` checks everything that needs neither Ray nor weights: spec, task, options, input
files and columns, model and adapter folders, output folder. The ``Plan`` it returns is all the
run layer needs, including the job's identity (``Plan.identity``) that every part records so
that a resume can refuse to mix two jobs' rows.
"""

from __future__ import annotations

import importlib.util
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import pyarrow as pa
from pydantic import ValidationError

from rayinfer.errors import InputError, ModelError, SpecError
from rayinfer.io.folder import prepare
from rayinfer.io.ids import find_duplicate_ids
from rayinfer.io.location import nested, redact, refuse_credentials
from rayinfer.io.scan import InputFile, check_columns, scan
from rayinfer.models.load import LoadContext
from rayinfer.models.locate import ModelLocation, check_remote_code, check_tokenizer, locate_model
from rayinfer.models.memory import MemoryNeed, actor_memory
from rayinfer.spec import CPU_BATCH_TOKENS, GPU_BATCH_TOKENS, JobSpec, format_validation_error, load_spec
from rayinfer.task.base import Task, TaskOptions
from rayinfer.task.registry import Registry, load_registry
from rayinfer.task.runner import output_schema
from rayinfer.version import __version__


@dataclass
class Plan:
    """A validated job: everything the pipeline needs, resolved."""

    spec: JobSpec
    task_cls: type[Task]
    plugin: str
    options: TaskOptions
    model: ModelLocation
    adapter: ModelLocation | None
    files: list[InputFile]
    input_schema: pa.Schema
    output_schema: pa.Schema
    column_map: dict[str, str]
    plugin_version: str | None = None
    warnings: list[str] = field(default_factory=list)
    tokenizer: ModelLocation | None = None  # the spec's tokenizer:, when the model's own is elsewhere
    duplicate_id_rows: int | None = None  # rows repeating another row's id (None: not checked)
    memory: dict[str, MemoryNeed] = field(default_factory=dict)  # an actor's, on "cpu" and "gpu" actors (local models)

    def memory_need(self, num_gpus: float | None) -> MemoryNeed | None:
        """An actor's memory where it runs: on a GPU when it holds one, else on the CPU."""
        return self.memory.get("gpu" if num_gpus else "cpu")

    @property
    def total_rows(self) -> int:
        return sum(f.num_rows for f in self.files)

    @property
    def read_columns(self) -> list[str]:
        cols = [self.spec.input.id_column, *self.column_map.values(), *self.spec.input.keep]
        return list(dict.fromkeys(cols))

    def load_context(self, num_threads: int | None = None) -> LoadContext:
        rt = self.spec.runtime
        return LoadContext(
            model=self.model.ref,
            tokenizer=self.tokenizer.ref if self.tokenizer else None,
            adapter=self.adapter.ref if self.adapter else None,
            merge_adapter=self.spec.merge_adapter,
            dtype=rt.dtype,
            device=rt.device,
            trust_remote_code=self.spec.trust_remote_code,
            num_threads=num_threads,
            gpu_share=min(1.0, rt.num_gpus) if rt.num_gpus else 1.0,
            engine=rt.engine,
            fingerprint="+".join(f for f in (self.model.fingerprint, self.adapter.fingerprint if self.adapter else None)
                                 if f) or None,
        )

    def identity(self) -> dict[str, Any]:
        """What produced a part, minus the run: a resume whose identity differs from a part's would
        mix two jobs' rows in one output. Input files are identified separately (per file)."""
        return {
            "task": self.task_cls.name,
            "plugin": self.plugin,
            "plugin_version": self.plugin_version,
            "model": self.spec.model,
            "model_fingerprint": self.model.fingerprint,
            "tokenizer": self.spec.tokenizer,  # None when the model's own (parts from before it was a key: None too)
            "tokenizer_fingerprint": self.tokenizer.fingerprint if self.tokenizer else None,
            "adapter": self.spec.adapter,
            "adapter_fingerprint": self.adapter.fingerprint if self.adapter else None,
            "options": self.options.model_dump(mode="json"),
            "output_schema": self.output_schema.remove_metadata().to_string(),
            "rayinfer_version": __version__,
        }

    def provenance(self, run_id: str) -> dict[str, Any]:
        """What each part records in its footer: the job's identity, the run, the model folder."""
        return {**self.identity(), "model_resolved": self.model.ref, "run_id": run_id}


def plan_job(
    spec: JobSpec | str | Path | Mapping[str, Any],
    overrides: list[str] | tuple[str, ...] = (),
    registry: Registry | None = None,
) -> Plan:
    """Validate a job completely without Ray and without loading weights."""
    if not isinstance(spec, JobSpec):
        spec = load_spec(dict(spec) if isinstance(spec, Mapping) else spec, overrides)
    elif overrides:
        spec = load_spec(spec.to_dict(), overrides)
    refuse_credentials(spec.input.path, "input.path", SpecError)  # before any line could print them
    refuse_credentials(spec.output.path, "output.path", SpecError)
    registry = registry or load_registry()
    task_cls = registry.get(spec.task)
    options = validate_options(task_cls, spec)

    unknown_inputs = set(spec.input.columns) - set(task_cls.inputs)
    if unknown_inputs:
        raise SpecError(
            f"input.columns maps {sorted(unknown_inputs)}, but task {spec.task!r} reads only "
            f"{sorted(task_cls.inputs)}"
        )
    column_map = {name: spec.input.columns.get(name, name) for name in task_cls.inputs}
    optional = {name for name, i in task_cls.inputs.items() if i.optional and name not in spec.input.columns}

    if nested(spec.input.path, spec.output.path):
        raise SpecError(
            f"output.path {redact(spec.output.path)!r} and input.path {redact(spec.input.path)!r} overlap: a later "
            "run would read the output parts as input (or overwrite would delete input files). Write the output "
            "outside the input folder."
        )
    files, schema = scan(spec.input.path, spec.input.format, spec.input.column_types, spec.input.delimiter,
                         required=(spec.input.id_column, *(c for n, c in column_map.items() if n not in optional)),
                         id_column=spec.input.id_column,
                         text_columns=tuple(c for n, c in column_map.items() if task_cls.inputs[n].dtype == "string"))
    # an optional input (classify's text_pair) is read where input.columns maps it or a column has its name
    column_map = {n: c for n, c in column_map.items() if n not in optional or c in schema.names}
    check_columns(schema, {spec.input.id_column: None}, "input.id_column")
    for name, col in column_map.items():
        check_columns(schema, {col: task_cls.inputs[name].dtype}, f"task input {name!r}")
    check_columns(schema, {k: None for k in spec.input.keep}, "input.keep")

    model = locate_model(spec.model)
    check_remote_code(model, spec.model, spec.trust_remote_code)
    tokenizer = locate_model(spec.tokenizer, what="tokenizer") if spec.tokenizer else None
    if task_cls.uses_tokenizer:
        check_tokenizer(tokenizer or model, spec.tokenizer or spec.model, "tokenizer" if tokenizer else "model")
    elif tokenizer is not None:
        raise SpecError(f"tokenizer: is set, but task {spec.task!r} uses no tokenizer; remove it")
    check_engine(task_cls, spec)
    options = task_cls.options_for_model(options, model)
    if model.config is not None:
        task_cls.check_model_config(model.config, options)
    adapter = locate_model(spec.adapter, what="adapter") if spec.adapter else None
    if adapter is not None and adapter.config is not None:
        kind, allowed = adapter.config.get("task_type"), task_cls.adapter_task_types(options)
        if kind and allowed is not None and kind not in allowed:
            raise ModelError(
                f"adapter {spec.adapter!r} is a {kind} adapter; task {spec.task!r} with these options takes "
                f"{' or '.join(sorted(allowed))} adapters"
            )
        check_adapter_fits(adapter.config, spec.model, model)

    prepare(spec.output.path, spec.output.mode, check_only=True)
    out_schema = output_schema(task_cls, options, schema, spec.input.id_column, spec.input.keep)
    # last: the one check that reads every row's id (its own pass over the input)
    warnings = []
    duplicate_id_rows = None
    if spec.input.duplicate_ids != "allow":
        found = find_duplicate_ids(files, spec.input.id_column)
        duplicate_id_rows = found.rows if found else 0
        if found and spec.input.duplicate_ids == "fail":
            raise InputError(
                f"input.path {redact(spec.input.path)!r}: {found.describe(spec.input.id_column)}. Outputs joined back "
                "by id would multiply these rows, and resume and retry reports could not tell them apart. Make the ids "
                "unique (or set input.id_column to a column that is), or set input.duplicate_ids: warn to run every "
                "row anyway"
            )
        if found:
            warnings.append(f"{found.describe(spec.input.id_column)}; every row is run (input.duplicate_ids: warn)")
    if model.kind == "hub":
        warnings.append(f"model {spec.model!r} is a hub id: it is downloaded by each node at run time")
    return Plan(
        spec=spec,
        task_cls=task_cls,
        plugin=registry.task_plugin[spec.task],
        options=options,
        model=model,
        adapter=adapter,
        files=files,
        input_schema=schema,
        output_schema=out_schema,
        column_map=column_map,
        plugin_version=registry.plugin_version(spec.task),
        warnings=warnings,
        tokenizer=tokenizer,
        duplicate_id_rows=duplicate_id_rows,
        memory=actor_memories(spec, task_cls, model, adapter),
    )


def actor_memories(spec: JobSpec, task_cls: type[Task], model: ModelLocation,
                   adapter: ModelLocation | None = None) -> dict[str, MemoryNeed]:
    """An actor's memory on CPUs and on a GPU, from the model's files (a local folder: a hub id is
    known only once downloaded) and the adapter's, the runtime's dtype and the task's working memory."""
    if model.kind != "local":
        return {}
    rt = spec.runtime
    out: dict[str, MemoryNeed | None] = {}
    cpu_tokens = rt.max_batch_tokens or task_cls.cpu_batch_tokens or CPU_BATCH_TOKENS
    traits = {"decodes": task_cls.decodes, "full_logits": task_cls.full_logits,
              "adapter": adapter.ref if adapter is not None and adapter.kind == "local" else None}
    if not rt.num_gpus:  # 0, or unset: CPU actors on a cluster without GPUs
        out["cpu"] = actor_memory(model.ref, model.config, rt.dtype, False, cpu_tokens, **traits)
    if rt.device != "cpu" and rt.num_gpus != 0:
        out["gpu"] = actor_memory(model.ref, model.config, rt.dtype, True, rt.max_batch_tokens or GPU_BATCH_TOKENS,
                                  **traits)
    return {k: v for k, v in out.items() if v is not None}


def check_engine(task_cls: type[Task], spec: JobSpec) -> None:
    """``runtime.engine``: one the task offers, installed here, in float32 on CPUs."""
    rt = spec.runtime
    if rt.engine == "torch":
        return
    if rt.engine not in task_cls.engines:
        raise SpecError(f"runtime.engine {rt.engine}: task {spec.task!r} runs on {' or '.join(task_cls.engines)} only")
    if any(importlib.util.find_spec(m) is None for m in ("onnxruntime", "onnx", "onnxscript")):
        raise SpecError(f"runtime.engine {rt.engine} needs onnxruntime, onnx and onnxscript: pip install 'rayinfer[onnx]'")
    if rt.dtype not in ("auto", "float32") or rt.device not in ("auto", "cpu") or rt.num_gpus:
        raise SpecError(f"runtime.engine {rt.engine} computes in float32 on CPUs: leave runtime.dtype, runtime.device "
                        "and runtime.num_gpus unset (or float32, cpu, 0)")


def validate_options(task_cls: type[Task], spec: JobSpec) -> TaskOptions:
    """The spec's ``options:`` as the task's Options, or a SpecError naming what is wrong (the one
    check of options, for ``plan_job`` and for ``rayinfer submit``, which plans on the cluster)."""
    try:
        return task_cls.Options.model_validate(spec.options)
    except ValidationError as exc:
        raise SpecError(
            f"options for task {spec.task!r}: " + format_validation_error(exc, task_cls.Options, prefix="options.")
            + f". See `rayinfer tasks show {spec.task}`."
        ) from None


def check_adapter_fits(adapter_cfg: dict[str, Any], model_ref: str, model: ModelLocation) -> None:
    """A PEFT adapter names its base model; refuse one made for a different architecture."""
    base = adapter_cfg.get("base_model_name_or_path")
    if not base or model.config is None:
        return
    base_config = Path(os.path.expanduser(base), "config.json")
    if not base_config.is_file():  # a hub id: nothing to compare offline
        return
    base_cfg = json.loads(base_config.read_text(encoding="utf-8"))
    for key in ("model_type", "hidden_size", "vocab_size", "num_hidden_layers"):
        if key in base_cfg and key in model.config and base_cfg[key] != model.config[key]:
            raise ModelError(
                f"adapter was trained on {base!r} ({key}={base_cfg[key]}), which does not fit model "
                f"{model_ref!r} ({key}={model.config[key]})"
            )
