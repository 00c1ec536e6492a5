"""An actor's memory, known before Ray starts: the model's parameters from its checkpoint files alone
(safetensors headers, or the ``.bin`` files' sizes), their bytes in the dtype the actor runs them
in, and what an actor holds besides: the Python, torch and Ray runtime, and the task's working
memory (a pass's activations at the token budget, a decode loop's KV cache).

Nothing here loads weights or imports torch: ``plan_job`` calls it for ``validate`` and the run's
first line.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TORCH_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8}

RUNTIME_MB = 750
"""An actor's memory besides its model and working memory: Python, torch, transformers, tokenizers,
pyarrow and Ray's worker. The tiny test models' actors peak at 544-571 MB of RSS in a fresh worker
process, at 669-703 MB in one that earlier actors of the same Ray job used (the test suite's: every
run_job of one Python process is one Ray job); all-MiniLM's embed actor (sentence-transformers too)
at 758 MB with 91 MB of weights (torch 2.13, transformers 5.25, Ray 2.60; tests/test_e2e_tasks.py
holds every task's estimate to its actor's measured peak)."""

DECODE_PASS_TOKENS = 8192
"""A decode loop's largest pass (a prefill of the rows joining, at most its slots) counted for its
activations, where its token budget is larger: the budget bounds its KV cache, not its passes.
SmolLM2, 64 chat prompts x 128 new tokens, the CPU defaults: 3.0 GB estimated, 2.43 GB measured."""

ACTIVATION_WIDTH = 24
"""Activations of one token in a forward pass, in units of the hidden size: the residual stream,
attention's q/k/v/out and the MLP's up (4x) and down projections live at once, and the allocator's
slack. A pass holds ``max_batch_tokens`` tokens."""


@dataclass(frozen=True)
class Weights:
    """A checkpoint's parameters, read from its files' headers and sizes."""

    params: int
    stored_bytes: int  # on disk
    how: str  # "safetensors headers (3 files)" ...
    stored_dtypes: tuple[tuple[str, int], ...] = ()  # (torch dtype name, bytes) of the float tensors; safetensors only

    def mostly_stored_in(self, dtype: str) -> bool:
        """Whether most of the float weights are stored in ``dtype`` (True where the files do not say)."""
        stored = dict(self.stored_dtypes)
        return not stored or 2 * stored.get(dtype, 0) >= sum(stored.values())


@dataclass(frozen=True)
class MemoryNeed:
    """What one actor holds on the host, by part (bytes)."""

    weights: Weights
    dtype: str
    weights_bytes: int
    runtime_bytes: int
    working_bytes: int
    on_gpu: bool = False  # the weights and working memory are on the GPU: the host holds the runtime only
    gpu_working_bytes: int = 0  # on a GPU: working memory besides a decode loop's KV cache (that fits what is left)
    adapter_params: int = 0  # a PEFT adapter's, counted in weights_bytes (merged or not, it is loaded whole)

    @property
    def host_bytes(self) -> int:
        return self.runtime_bytes + (0 if self.on_gpu else self.weights_bytes + self.working_bytes)

    def gpu_bytes(self, gpus: float) -> int:
        """What each GPU of an actor on ``gpus`` GPUs must hold: its share of the weights (a model
        across several GPUs is split by layers) and the working memory."""
        return int(self.weights_bytes / max(1.0, gpus)) + self.gpu_working_bytes

    def summary(self) -> dict[str, Any]:
        """What the manifest records (``actor_memory_need``)."""
        return {"params": self.weights.params, "dtype": self.dtype, "weights_mb": round(self.weights_bytes / 1e6, 1),
                "host_mb": round(self.host_bytes / 1e6, 1)}

    def parts(self) -> str:
        """Where the host memory goes, largest first."""
        parts = [(self.runtime_bytes, f"the runtime {gb(self.runtime_bytes)}")]
        if not self.on_gpu:
            parts += [(self.weights_bytes, f"weights {gb(self.weights_bytes)} ({params_text(self.weights.params)} "
                                           f"parameters in {self.dtype})"),
                      (self.working_bytes, f"working memory {gb(self.working_bytes)}")]
        return ", ".join(text for _, text in sorted(parts, key=lambda p: -p[0]))

    def describe(self) -> str:
        where = "per GPU actor, on its GPU" if self.on_gpu else "per actor"
        total = (f"; an actor holds about {gb(self.host_bytes)} of host memory (the runtime "
                 f"{gb(self.runtime_bytes)}" + ("" if self.on_gpu else f", working memory {gb(self.working_bytes)}")
                 + ")")
        adapter = f" and an adapter of {params_text(self.adapter_params)}" if self.adapter_params else ""
        return (f"model: {params_text(self.weights.params)} parameters{adapter}, {gb(self.weights_bytes)} in {self.dtype} "
                f"{where}{total}")


def gb(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.0f} MB"


def params_text(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}" if unit == "B" else f"{n / size:.0f}{unit}"
    return str(n)


def checkpoint_weights(folder: str | Path, config: dict[str, Any] | None = None) -> Weights | None:
    """The parameters of the checkpoint in ``folder``: from the safetensors files' headers (the
    index's shards where there is one), else from the ``.bin`` files' sizes and the dtype the
    config says they hold. None where the folder has neither."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    shards = (sorted({folder / f for f in json.loads(index.read_text())["weight_map"].values()}) if index.is_file()
              else sorted(folder.glob("*.safetensors")))
    if shards:
        params = stored = 0
        dtypes: dict[str, int] = {}
        for shard in shards:
            p, b = _safetensors_header(shard, dtypes)
            params, stored = params + p, stored + b
        return Weights(params, stored, f"safetensors headers ({len(shards)} file{'s' * (len(shards) > 1)})",
                       tuple(sorted(dtypes.items())))
    dtype = str((config or {}).get("torch_dtype") or (config or {}).get("dtype") or "float32")
    bin_index = folder / "pytorch_model.bin.index.json"
    if bin_index.is_file():
        index = json.loads(bin_index.read_text())
        total = (index.get("metadata") or {}).get("total_size")
        bins = [folder / n for n in sorted(set(index["weight_map"].values()))]
        if total:
            return Weights(int(total) // TORCH_BYTES.get(dtype, 4), int(total),
                           f"the .bin index's total_size ({len(bins)} files), as {dtype}")
    else:
        bins = sorted(folder.glob("*.bin"))
    bins = [b for b in bins if b.is_file() and b.name != "training_args.bin"]
    if not bins:
        return None
    stored = sum(b.stat().st_size for b in bins)  # pickle framing adds a little
    return Weights(stored // TORCH_BYTES.get(dtype, 4), stored, f"the .bin files' sizes ({len(bins)}), as {dtype}")


SAFETENSORS_FLOATS = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64"}


def _safetensors_header(path: Path, dtypes: dict[str, int]) -> tuple[int, int]:
    """(parameters, bytes) of one safetensors file, from its header alone; adds the bytes of its
    float tensors by dtype to ``dtypes``."""
    with path.open("rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(length))
    params = stored = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        size = info["data_offsets"][1] - info["data_offsets"][0]
        params, stored = params + math.prod(info["shape"]), stored + size
        kind = SAFETENSORS_FLOATS.get(info.get("dtype", ""))
        if kind is not None:
            dtypes[kind] = dtypes.get(kind, 0) + size
    return params, stored


def run_dtype(dtype: str, on_gpu: bool) -> str:
    """The dtype the actor runs the weights in (``rayinfer.models.load.resolve_dtype``'s rule)."""
    if dtype == "auto":
        return "bfloat16" if on_gpu else "float32"
    return dtype


def working_bytes(config: dict[str, Any], dtype_bytes: int, batch_tokens: int, kv_tokens: int = 0,
                  full_logits: bool = False, packed_params: int = 0) -> int:
    """A task's working memory: one pass's activations at ``batch_tokens`` (and, for a task that
    scores every token, the pass's vocabulary logits, with their log-softmax), ``kv_tokens`` of a
    decode loop's KV cache, and ``packed_params`` of prepacked weights (a decode loop on CPUs keeps
    a oneDNN copy of its linear layers' weights: ``rayinfer.decoding.fast``)."""
    text = config.get("text_config") or config
    vocab = int(text.get("vocab_size") or 32000)
    passes = min(batch_tokens, DECODE_PASS_TOKENS) if kv_tokens else batch_tokens
    activations = passes * _hidden(text) * ACTIVATION_WIDTH * 4  # fp32 where it matters (scores, norms)
    logits = batch_tokens * vocab * 4 * 2 if full_logits else 0
    kv = kv_tokens * kv_bytes_per_token(text, dtype_bytes)
    return activations + logits + kv + packed_params * dtype_bytes


def _hidden(config: dict[str, Any]) -> int:
    return int(config.get("hidden_size") or config.get("d_model") or config.get("n_embd") or 768)


def kv_bytes_per_token(config: dict[str, Any], dtype_bytes: int) -> int:
    """One token's keys and values in every layer of a decoder with this (text) config, as a dict
    (``config.json``'s, or ``PretrainedConfig.to_dict()``)."""
    layers = int(config.get("num_hidden_layers") or config.get("num_layers") or config.get("n_layer") or 12)
    heads = int(config.get("num_attention_heads") or config.get("num_heads") or config.get("n_head") or 12)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or _hidden(config) // max(1, heads))
    return 2 * layers * kv_heads * head_dim * dtype_bytes


def actor_memory(folder: str | Path, config: dict[str, Any] | None, dtype: str, on_gpu: bool, batch_tokens: int,
                 decodes: bool = False, full_logits: bool = False, adapter: str | Path | None = None
                 ) -> MemoryNeed | None:
    """One actor's memory for the model in ``folder`` (None: the folder tells nothing, e.g. a hub
    id not downloaded yet). ``decodes``: a decode loop, whose KV cache ``batch_tokens`` bounds and
    which on CPUs keeps its weights prepacked too; ``full_logits``: the task scores every token;
    ``adapter``: a PEFT adapter's local folder."""
    weights = checkpoint_weights(folder, config)
    if weights is None:
        return None
    name = run_dtype(dtype, on_gpu)
    size = TORCH_BYTES.get(name, 4)
    work = working_bytes(config or {}, size, batch_tokens, batch_tokens if decodes else 0, full_logits,
                         weights.params if decodes and not on_gpu else 0)
    gpu_work = working_bytes(config or {}, size, batch_tokens, 0, full_logits) if on_gpu else 0
    extra = checkpoint_weights(adapter) if adapter is not None and Path(adapter).is_dir() else None
    added = extra.params if extra else 0
    return MemoryNeed(weights, name, (weights.params + added) * size, RUNTIME_MB * 10**6, work, on_gpu, gpu_work, added)
