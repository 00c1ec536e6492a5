"""The job spec: a YAML file validated by pydantic before anything heavy starts.

Relative paths in a spec are relative to the working directory the job runs in (as with
``ray job submit``'s working_dir), so the same spec works locally and on a cluster.
"""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayinfer.errors import SpecError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(_Strict):
    path: str = Field(
        description="A file, a folder of files (recursive; a folder with a state.json is a Hugging Face "
        "save_to_disk dataset), or a glob."
    )
    format: Literal["auto", "parquet", "arrow", "jsonl", "csv"] = Field(
        "auto",
        description="auto: by extension (.parquet/.pq, .arrow/.feather/.ipc, .jsonl/.ndjson, .csv/.tsv). arrow: "
        "Arrow IPC files or streams (Feather v2, Hugging Face datasets).",
    )
    column_types: dict[str, str] = Field(
        default_factory=dict,
        description="JSON Lines / CSV: column -> Arrow type (string, int64, float64, bool, ...); columns not named "
        "are typed from the first file's first MiB.",
    )
    delimiter: str | None = Field(
        None, min_length=1, max_length=1, description="CSV: the field delimiter; default: tab for .tsv, else a comma."
    )
    id_column: str = Field("id", description="The column that identifies a row; copied to the output.")
    duplicate_ids: Literal["fail", "warn", "allow"] = Field(
        "fail",
        description="Ids that more than one row has (found in one pass over the id column before Ray starts). "
        "fail: refuse the job, with a count and examples; warn: run every row and say how many repeat; allow: "
        "no check (saves the pass).",
    )
    columns: dict[str, str] = Field(
        default_factory=dict,
        description="Task input name -> dataset column, e.g. {text: sentence}. Unmapped inputs use their own name.",
    )
    keep: list[str] = Field(default_factory=list, description="Columns passed through to the output unchanged.")
    on_unreadable: Literal["fail", "skip"] = Field(
        "fail",
        description="A row group that cannot be read at run time (damaged data behind a good footer). fail: stop "
        "the run, naming file and row group, committed parts kept; skip: its rows become error rows (null id, "
        "error 'unreadable') and the run goes on.",
    )


class OutputSpec(_Strict):
    path: str = Field(description="The output folder (Parquet part files plus _manifest.json).")
    mode: Literal["error", "overwrite", "resume"] = Field(
        "error",
        description="error: refuse an existing non-empty folder; overwrite: replace earlier output; "
        "resume: keep committed parts and process only the rows they do not cover.",
    )
    part_rows: int = Field(
        1_000_000,
        gt=0,
        description="Most input rows per output part (a part is one work unit: rows of one input file, or of several small files packed together). A crash "
        "loses at most the part each actor is writing, so smaller parts lose less work but make more files. "
        "Jobs too small to give every actor several parts of this size get smaller parts.",
    )
    part_bytes: int = Field(
        128 << 20,
        gt=0,
        description="A part is committed once it holds about this many bytes of Parquet, even before part_rows.",
    )


class ActorRange(_Strict):
    min: int = Field(1, ge=1, description="Actors started up front.")
    max: int = Field(description="Most actors the pool may grow to while there is work.")

    @model_validator(mode="after")
    def _order(self) -> "ActorRange":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


CPU_BATCH_TOKENS = 2048
GPU_BATCH_TOKENS = 16384


class RuntimeSpec(_Strict):
    batch_size: int = Field(
        256,
        gt=0,
        description="Rows an actor reads, tokenizes and runs at a time. It sorts them by length before cutting "
        "micro-batches, so larger batches pad less.",
    )
    max_batch_tokens: int | None = Field(
        None,
        gt=0,
        description="Token budget of one forward pass (rows x longest row, padding included); default 16384 "
        "on GPU actors; on CPU actors 2048 for encoder tasks (larger passes are slower there) and 16384 "
        "for generation (measured in benchmarks/).",
    )
    actors: Union[int, ActorRange, None] = Field(
        None, description="Actor pool size: an int, {min, max}, or unset to fit the cluster's CPUs/GPUs."
    )
    num_cpus: Optional[float] = Field(
        None, gt=0, description="CPUs reserved per actor (also its torch thread count). Unset: 1, but a generation "
        "task on CPUs gets a node's CPUs (up to 8): one actor decodes bigger batches on more threads.")
    num_gpus: Optional[float] = Field(
        None, ge=0, description="GPUs per actor (fractions share a GPU). Unset: 1 where the cluster has GPUs and "
        "runtime.device is not cpu, else 0.")
    resources: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per actor.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto: bfloat16 on GPUs, float32 on CPUs."
    )
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N.")
    engine: Literal["torch", "onnxruntime"] = Field(
        "torch", description="What computes the model: torch; or onnxruntime (CPU, float32) for the tasks that "
        "offer it (embed): the model is exported to ONNX once per model and versions, into rayinfer's cache.")
    max_error_rate: float | None = Field(
        None, ge=0, le=1, description="Abort when the fraction of rows with an error passes this (judged once 1000 rows, "
        "or all, are done). Unset: never."
    )
    actor_start_timeout_s: int = Field(
        900,
        gt=0,
        description="Rows flow once the pool's first actors (actors, or actors.min) have loaded the model; the "
        "run fails if they are not up within this many seconds (leave time for an autoscaler to add nodes).",
    )
    worker_crash_retries: int = Field(
        1,
        ge=0,
        description="A batch whose rows killed their worker process (a segfault, an OOM kill) is run again "
        "as it was this many times, then split in halves until the row that kills is alone; that row gets "
        "an error (worker_crash), every other row its output.",
    )
    max_worker_deaths: int = Field(
        30,
        gt=0,
        description="The run fails once the rows of one work unit have killed this many worker processes "
        "(isolating one such row costs about (worker_crash_retries + 1) x log2(batch_size) + 1 deaths): "
        "deaths that many are a sick node or a model too big for memory, not a bad row.",
    )
    stop_timeout_s: int = Field(
        60,
        ge=0,
        description="On Ctrl-C, SIGTERM or `rayinfer stop`: how long actors may take to commit the rows they "
        "hold before the run ends anyway (a second Ctrl-C ends it at once).",
    )

    @model_validator(mode="after")
    def _actors(self) -> "RuntimeSpec":
        if isinstance(self.actors, int) and self.actors < 1:
            raise ValueError("actors must be >= 1")
        if self.device.startswith("cuda") and self.num_gpus == 0:
            raise ValueError(f"device is {self.device!r} but num_gpus is 0: an actor computes only on the GPUs Ray "
                             "gives it. Leave num_gpus unset (1 per actor) or set it above 0")
        return self



class JobSpec(_Strict):
    task: str = Field(description="The task name (see `rayinfer tasks`).")
    model: str = Field(description="A local model folder, a catalog name, or a Hugging Face hub id.")
    tokenizer: str | None = Field(
        None, description="A folder or hub id to load the tokenizer from, for a checkpoint saved without its "
        "tokenizer (the base model's). Unset: the model's own, which must be there.")
    adapter: str | None = Field(None, description="A PEFT adapter folder or hub id, loaded onto the model.")
    merge_adapter: bool = Field(True, description="Merge the adapter into the weights (faster) or keep it apart.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model folder/hub to run.")
    input: InputSpec
    output: OutputSpec
    options: dict[str, Any] = Field(default_factory=dict, description="The task's own options.")
    runtime: RuntimeSpec = Field(default_factory=RuntimeSpec)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")


def parse_override(text: str) -> tuple[list[str], Any]:
    """``runtime.batch_size=32`` -> (["runtime", "batch_size"], 32); values are YAML scalars/lists."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise SpecError(f"--set {text!r}: expected KEY=VALUE, e.g. --set runtime.batch_size=32")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise SpecError(f"--set {text!r}: the value is not valid YAML: {exc}") from None
    return key.strip().split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of ``data`` with the ``--set`` overrides applied (the caller's dict is untouched)."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise SpecError(f"--set {text!r}: {k!r} is not a mapping in the spec")
            node = child
        node[keys[-1]] = value
    return data


def load_spec_file(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise SpecError(f"job spec {str(p)!r} not found")
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SpecError(f"{p}: not valid YAML: {exc}") from None
    except UnicodeDecodeError:
        raise SpecError(f"{p}: not a UTF-8 text file") from None
    if not isinstance(data, dict):
        raise SpecError(f"{p}: a job spec must be a YAML mapping with keys task, model, input, output, ...")
    return data


def load_spec(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> JobSpec:
    """Load a spec from a YAML path or a dict, apply ``--set`` overrides, and validate it."""
    if isinstance(source, dict):
        data, where = dict(source), "job spec"
    else:
        data, where = load_spec_file(source), str(source)
    data = apply_overrides(data, list(overrides))
    try:
        return JobSpec.model_validate(data)
    except ValidationError as exc:
        raise SpecError(f"{where}: " + format_validation_error(exc, JobSpec)) from None


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    """One line per problem, naming the field, what was wrong, and a "did you mean" for typos."""
    lines = []
    for err in exc.errors():
        # drop pydantic's union-branch markers such as 'int' or 'ActorRange'
        # (the last part of an unknown-key error is the user's key, whatever it is called)
        parts = [str(p) for p in err["loc"]]
        keep_last = err["type"] == "extra_forbidden" and parts
        loc = [p for p in (parts[:-1] if keep_last else parts) if not _is_union_marker(p)] + (parts[-1:] if keep_last else [])
        field = prefix + ".".join(loc) if loc else prefix.rstrip(".") or "spec"
        if err["type"] == "extra_forbidden":
            known = _known_keys(model, [p for p in err["loc"][:-1]])
            hint = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
            msg = f"unknown key {field!r}"
            msg += f" (did you mean {prefix + '.'.join(map(str, err['loc'][:-1] + (hint[0],)))!r}?)" if hint else ""
            msg += f"; allowed here: {', '.join(sorted(known))}" if known else ""
            lines.append(msg)
        elif err["type"] == "missing":
            lines.append(f"{field}: required but missing")
        else:
            got = err.get("input")
            shown = repr(got) if not isinstance(got, dict) else "a mapping"
            if len(shown) > 60:
                shown = shown[:57] + "..."
            lines.append(f"{field}: {err['msg']} (got {shown})")
    unique = list(dict.fromkeys(lines))
    return "; ".join(unique)


def _is_union_marker(part: str) -> bool:
    return part in {"int", "float", "str", "ActorRange"} or part.startswith("function-")


def _known_keys(model: type[BaseModel], loc: list[Any]) -> list[str]:
    current: Any = model
    for part in loc:
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None
