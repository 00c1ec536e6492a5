"""embed: one vector per text, as the model's sentence-transformers modules make it.

A sentence-transformers folder says how its vectors are made: ``modules.json`` lists the stack
(the transformer, then Pooling by CLS, mean, max or last token, a Dense projection, Normalize),
``config_sentence_transformers.json`` the query/document prompts. sentence-transformers loads
and runs that stack here, so every module it knows is honoured; a plain transformers encoder
without those files gets mean pooling, as sentence-transformers gives it. rayinfer keeps what
it adds around the stack: rows tokenized on the prep thread, batches cut by tokens (sorted by
length, so padding stays small), a ``truncated`` flag per row, and a fixed-size vector column
(``fixed_size_list<float32>[dim]``, what LanceDB, DuckDB's ``ARRAY`` and vector loaders take).

Outputs match ``SentenceTransformer.encode`` with the same prompt, ``truncate_dim``,
``normalize_embeddings`` and ``precision``.
"""

from __future__ import annotations

import importlib.util
import time
from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from rayinfer import Batch, InputColumn, RowError, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError, SpecError
from rayinfer.models.locate import ModelLocation, read_model_file
from rayinfer.text import ENCODED_KEYS, collate, ensure_pad_token, max_input_length

ELEMENT = {"float32": pa.float32(), "float16": pa.float16(), "int8": pa.int8(), "uint8": pa.uint8(),
           "binary": pa.int8(), "ubinary": pa.uint8()}
INSTALL = "embed needs sentence-transformers: pip install 'rayinfer[embed]'"
# modules that keep the vector's size (anything else unknown: set options.dimensions)
SAME_SIZE = ("Transformer", "Normalize", "Dropout", "LayerNorm", "WordEmbeddings")
POOLING_FLAGS = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                 "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")


class EmbedTask(Task):
    name = "embed"
    description = ("Sentence embeddings as the model's sentence-transformers modules make them (CLS, mean, max or "
                   "last-token pooling, Dense, Normalize, query/document prompts); a fixed-size vector per row.")
    inputs = {"text": InputColumn("The text to embed (a query or a document: see prompt_name).")}
    cpu_batch_tokens = 1024  # measured (benchmarks/embed.py): smaller passes stay in cache
    engines = ("torch", "onnxruntime")

    class Options(TaskOptions):
        prompt_name: str | None = Field(
            None, description="A prompt the model's config_sentence_transformers.json names (e.g. query, document), "
            "put before each text as encode(prompt_name=...) does; default: the model's default prompt, if any.")
        prompt: str | None = Field(None, description="A literal prompt put before each text (instead of prompt_name).")
        normalize: bool | None = Field(
            None, description="true: scale each vector to unit length (after truncate_dim); false: leave out the "
            "model's Normalize module; default: as the model's modules say.")
        truncate_dim: int | None = Field(
            None, ge=1, description="Keep the first N dimensions (Matryoshka models), as encode(truncate_dim=N).")
        max_length: int | None = Field(
            None, ge=2, description="Token limit per text (rows over it are cut and flagged truncated); default: the "
            "model's max_seq_length.")
        precision: Literal["float32", "float16", "int8", "uint8", "binary", "ubinary"] = Field(
            "float32", description="The vector's element type: float32; float16; int8 / uint8 scalar-quantized "
            "(needs int8_ranges, or unit-length vectors: range -1..1 per dimension); binary / ubinary: one bit per "
            "dimension, packed 8 to a byte (as sentence-transformers' quantize_embeddings).")
        int8_ranges: list[list[float]] | None = Field(
            None, description="For int8 / uint8: [[min per dimension], [max per dimension]], e.g. computed from a "
            "sample of float32 embeddings; default: -1..1 (unit-length vectors).")
        dimensions: int | None = Field(
            None, ge=1, description="The model's vector size: read from its files before Ray starts (Pooling, Dense, "
            "config.json); set it only for a hub model not in the local cache.")

        @model_validator(mode="after")
        def _consistent(self) -> EmbedTask.Options:
            if self.prompt is not None and self.prompt_name is not None:
                raise ValueError("set prompt or prompt_name, not both")
            if self.int8_ranges is not None:
                if self.precision not in ("int8", "uint8"):
                    raise ValueError("int8_ranges is for precision int8 or uint8")
                if len(self.int8_ranges) != 2 or len(self.int8_ranges[0]) != len(self.int8_ranges[1]):
                    raise ValueError("int8_ranges must be two lists of the same length: [[min...], [max...]]")
            return self

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        assert isinstance(options, EmbedTask.Options)
        dim = output_dimensions(options)
        vector = pa.list_(ELEMENT[options.precision], dim) if dim else pa.list_(ELEMENT[options.precision])
        return pa.schema([pa.field("embedding", vector), pa.field("truncated", pa.bool_())])

    @classmethod
    def options_for_model(cls, options: TaskOptions, model: ModelLocation) -> TaskOptions:
        assert isinstance(options, EmbedTask.Options)
        if importlib.util.find_spec("sentence_transformers") is None:  # found, not imported: plan stays light
            raise SpecError(INSTALL)
        settings = read_model_file(model, "config_sentence_transformers.json") or {}
        prompts = {"query": "", "document": "", **(settings.get("prompts") or {})}
        if options.prompt_name is not None and options.prompt_name not in prompts:
            raise SpecError(f"options.prompt_name {options.prompt_name!r}: the model's prompts are "
                            f"{', '.join(sorted(prompts))}")
        found = model_dimensions(model)
        if options.dimensions is not None and found is not None and options.dimensions != found:
            raise SpecError(f"options.dimensions is {options.dimensions}, but the model's vectors have {found}")
        dim = options.dimensions or found
        if dim is None:
            raise SpecError(f"cannot tell the size of {model.ref!r}'s vectors before loading it (its modules are not "
                            "all known, or it is not in the local cache): set options.dimensions")
        if options.truncate_dim is not None and options.truncate_dim > dim:
            raise SpecError(f"options.truncate_dim {options.truncate_dim} is more than the model's {dim} dimensions")
        ranges = options.int8_ranges
        if ranges is not None and len(ranges[0]) != (options.truncate_dim or dim):
            raise SpecError(f"options.int8_ranges has {len(ranges[0])} values per row; the vectors have "
                            f"{options.truncate_dim or dim} dimensions")
        return options.model_copy(update={"dimensions": dim})

    def load(self) -> None:
        try:
            from sentence_transformers import SentenceTransformer
        except ImportError:
            raise ModelError(INSTALL) from None
        import numpy as np
        import torch
        from transformers.utils import logging as hf_logging

        from rayinfer.models.load import (attach_adapter, check_tokenizer_vocabulary, load_tokenizer, resolve_device,
                                          resolve_dtype)

        hf_logging.disable_progress_bar()
        ctx = self.context
        device = resolve_device(ctx.device)
        if ctx.num_threads:
            torch.set_num_threads(ctx.num_threads)
        try:
            st = SentenceTransformer(ctx.model, device="cpu", trust_remote_code=ctx.trust_remote_code,
                                     model_kwargs={"dtype": resolve_dtype(ctx.dtype, device)})
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load {ctx.model!r} with sentence-transformers: {exc}") from None
        if ctx.tokenizer:  # the spec's tokenizer: the checkpoint was saved without its own
            if not hasattr(st[0], "processor"):
                raise ModelError(f"tokenizer: {ctx.tokenizer!r}: the first module of {ctx.model!r} is a "
                                 f"{type(st[0]).__name__}, which takes no tokenizer")
            st[0].processor = load_tokenizer(ctx)
        elif st.tokenizer is not None:
            check_tokenizer_vocabulary(st.tokenizer, ctx.model)
        if ctx.adapter:  # onto the transformer inside the stack
            first = st[0]
            if not isinstance(getattr(first, "model", None), torch.nn.Module):
                raise ModelError(f"adapter {ctx.adapter!r}: the first module of {ctx.model!r} is a "
                                 f"{type(first).__name__}, not a transformer an adapter can attach to")
            first.model = attach_adapter(first.model, ctx.adapter, merge=ctx.merge_adapter)
        o = self.options
        if o.normalize is False:  # the raw pooled (or projected) vectors
            for name, module in list(st.named_children()):
                if type(module).__name__ == "Normalize":
                    del st._modules[name]
        self.st = st.to(device).eval()
        self.tokenizer = st.tokenizer
        ensure_pad_token(self.tokenizer)  # a decoder's tokenizer without one: eos pads (masked out)
        size = st.get_embedding_dimension()
        if size is not None and o.dimensions is not None and size != o.dimensions:
            raise ModelError(f"{ctx.model!r} makes vectors of {size} dimensions; the job was planned for {o.dimensions}")
        limit = st.max_seq_length or max_input_length(self.tokenizer, getattr(st[0], "model", None))
        st.max_seq_length = self.max_length = min(o.max_length, limit) if o.max_length else limit
        if o.prompt is not None:
            self.prompt = o.prompt
        else:
            name = o.prompt_name or st.default_prompt_name
            self.prompt = st.prompts.get(name) if name else None
        self.onnx = None  # (session, input names, the feature it makes): the transformer on ONNX Runtime
        if ctx.engine == "onnxruntime":
            session, names, made, self.engine_report = onnx_encoder(st, ctx)
            self.onnx = (session, names, made, list(st)[1:])  # ... and the rest of the stack, as it is
        self.model_normalizes = any(type(m).__name__ == "Normalize" for m in st)  # (normalize false removed it)
        # every component of a unit vector, truncated or not, lies in -1..1
        unit = o.normalize is True or self.model_normalizes
        self.ranges = None
        if o.precision in ("int8", "uint8"):
            if o.int8_ranges is not None:
                self.ranges = np.asarray(o.int8_ranges, dtype=np.float32)
            elif unit:
                dim = o.truncate_dim or size
                self.ranges = np.stack([-np.ones(dim, np.float32), np.ones(dim, np.float32)])
            else:
                raise ModelError(f"precision {o.precision} needs int8_ranges: these vectors are not unit length "
                                 "(the model does not normalize them; or set normalize: true)")

    def preprocess(self, batch: Batch) -> list[Any]:
        # sentence-transformers' own preprocessing (the prompt, its max_seq_length, a prompt_length for
        # pooling that leaves the prompt out), unpadded per row so the runner can sort and cut by tokens
        texts = batch["text"]
        features = self.st.preprocess(texts, prompt=self.prompt)
        tensors = {k: v for k, v in features.items() if k in ENCODED_KEYS}
        extras = {k: v for k, v in features.items() if k not in tensors}
        mask = tensors["attention_mask"].bool()
        items = [{k: v[i][mask[i]].tolist() for k, v in tensors.items()} | {"extras": extras, "truncated": False}
                 for i in range(len(texts))]
        full = [i for i, item in enumerate(items) if len(item["input_ids"]) >= self.max_length]
        if full:  # at the limit: was the text longer? (count it uncut)
            prompt = self.prompt or ""
            counts = self.tokenizer([prompt + texts[i] for i in full], truncation=False, verbose=False)["input_ids"]
            for i, ids in zip(full, counts):
                items[i]["truncated"] = len(ids) > self.max_length
        return items

    def forward(self, items: list[Any]) -> list[Any]:
        import torch

        side = getattr(self.tokenizer, "padding_side", "right")
        features = collate(items, self.tokenizer, self.st.device, side=side) | items[0]["extras"]
        if self.onnx is None:
            features = self.st(features)
        else:
            session, names, made, rest = self.onnx
            features[made] = torch.from_numpy(session.run(None, {n: features[n].numpy() for n in names})[0])
            for module in rest:
                features = module(features)
        pooled = features["sentence_embedding"]
        vectors = pooled.float()
        if self.model_normalizes and pooled.dtype != torch.float32:  # a bf16 Normalize is off by up to 0.4%
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        if self.options.truncate_dim:
            vectors = vectors[..., : self.options.truncate_dim]
        if self.options.normalize:
            vectors = torch.nn.functional.normalize(vectors, p=2, dim=-1)
        finite = torch.isfinite(vectors).all(dim=-1).tolist()
        return [(v, it["truncated"]) if ok else RowError("the model gave a vector with NaN or infinite values",
                                                         "non_finite")
                for v, it, ok in zip(vectors.cpu().numpy(), items, finite)]

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        import numpy as np

        precision = self.options.precision
        vectors = np.stack([v for v, _ in outputs])
        if precision == "float16":
            vectors = vectors.astype(np.float16)
        elif precision != "float32":
            from sentence_transformers import quantize_embeddings

            vectors = quantize_embeddings(vectors, precision=precision, ranges=self.ranges)
        return {"embedding": list(vectors), "truncated": [t for _, t in outputs]}


def onnx_encoder(st: Any, ctx: Any) -> tuple[Any, list[str], str, dict[str, str]]:
    """The stack's transformer exported to ONNX (once per model and versions: rayinfer.models.onnx)
    and a session over it: (session, its input names, the feature it makes, what the manifest says
    of it: exported here or read from the cache). Refused in one line
    where the stack's first module is not a plain text transformer whose hidden states feed the
    rest (another modality, hidden states of every layer)."""
    import inspect

    from rayinfer.models.onnx import cache_key, exported, session, weights_identity

    first = st[0]
    model = getattr(first, "model", None)
    text = (getattr(first, "modality_config", None) or {}).get("text") or {}
    output = text.get("method_output_name")
    if (type(first).__name__ != "Transformer" or model is None or text.get("method") != "forward"
            or output not in ("last_hidden_state", ["last_hidden_state"], ("last_hidden_state",))
            or getattr(model.config, "output_hidden_states", False)):
        raise ModelError(f"runtime.engine onnxruntime: the first module of {ctx.model!r} ({type(first).__name__}) is "
                         "not a text transformer whose last hidden states feed the rest; run it with runtime.engine: "
                         "torch")
    accepted = set(inspect.signature(model.forward).parameters)
    example = st.tokenizer(["an example to export with", "and a longer one, so that the two differ in length"],
                           padding=True, return_tensors="pt")
    names = [n for n in ENCODED_KEYS if n in example and n in accepted]
    started = time.perf_counter()
    key = cache_key(weights_identity(ctx, model), f"{type(model).__name__}.last_hidden_state.eager", names)
    attention = getattr(model.config, "_attn_implementation", None)
    if attention not in (None, "eager"):  # ONNX Runtime runs attention written out faster than SDPA's export:
        model.set_attn_implementation("eager")  # all-MiniLM, same process, 1.24x torch against 1.12x
    try:
        path, made = exported(model, {n: example[n] for n in names}, "last_hidden_state", key)
    finally:
        if attention not in (None, "eager"):
            model.set_attn_implementation(attention)
    report = {"engine": "onnxruntime", "onnx_file": str(path),
              "onnx": f"exported in {time.perf_counter() - started:.1f} s" if made else "read from the cache"}
    return session(path, ctx.num_threads), names, getattr(first, "module_output_name", "token_embeddings"), report


def output_dimensions(options: EmbedTask.Options) -> int | None:
    """The size of the ``embedding`` column's vectors (None before the plan has read the model)."""
    dim = options.truncate_dim or options.dimensions
    if dim and options.precision in ("binary", "ubinary"):
        return -(-dim // 8)
    return dim


def model_dimensions(model: ModelLocation) -> int | None:
    """The vector size the model's sentence-transformers modules give, from their config files
    (no weights read): the last Dense's out_features, else the Pooling's size times its modes,
    else (no modules.json: a plain encoder, mean-pooled) the config's hidden size."""
    modules = read_model_file(model, "modules.json")
    if modules is None:
        cfg = model.config or {}
        return cfg.get("hidden_size") or cfg.get("d_model")
    size = None
    for module in modules:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = module.get("path", "")
        if kind == "Pooling":
            cfg = read_model_file(model, f"{path}/config.json") or {}
            dim = cfg.get("embedding_dimension") or cfg.get("word_embedding_dimension")
            modes = cfg.get("pooling_mode")
            count = (len(modes) if isinstance(modes, list) else 1) if modes else sum(bool(cfg.get(f)) for f in POOLING_FLAGS)
            size = dim * max(count, 1) if dim else None
        elif kind == "Dense":
            size = (read_model_file(model, f"{path}/config.json") or {}).get("out_features")
        elif kind == "Transformer":
            cfg = model.config or {}
            size = cfg.get("hidden_size") or cfg.get("d_model")
        elif kind not in SAME_SIZE:
            return None
    return size


@hookimpl
def register_tasks(register: Any) -> None:
    register(EmbedTask)


