"""summarize: seq2seq models (T5, BART) with a source prefix, or causal LMs through a prompt."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from rayinfer import Batch, ModelRequirement, RowError, Task, TaskOptions, hookimpl
from rayinfer.text import cut_text, encode, encode_prompts, require_text_slot

from rayinfer_tasks._generation import SamplingOptions, generate, generate_stream, ready_for_decoding, streamable

DEFAULT_INSTRUCTION = "Summarize the following text in one or two sentences.\n\n{text}"


class SummarizeTask(Task):
    name = "summarize"
    # As for generate: decode batches are cut by rows, the budget bounds their KV cache. With 64
    # new tokens the decode loop dominates: 14 texts of 300-600 tokens ran 0.81x a plain loop at
    # 4096 (passes of 6 rows), 0.94x at 16384 (benchmarks/generation.py).
    cpu_batch_tokens = 16384
    decodes = True
    schedules = True  # forward gets all of a batch's rows: continuous batching (rayinfer.decoding)
    description = "Summarize texts: seq2seq (T5/BART, with a prefix) or a causal LM prompted by an instruction."
    requires = ModelRequirement(
        "AutoModelForSeq2SeqLM",  # or AutoModelForCausalLM: see auto_class
        architectures=("ForCausalLM", "ForConditionalGeneration"),
        what="a seq2seq or causal LM",
        encoder_decoder=True,
        adapter_task_types=frozenset({"CAUSAL_LM", "SEQ_2_SEQ_LM"}),
    )
    max_length_option = "max_input_tokens"

    class Options(SamplingOptions):
        prefix: str = Field("", description='Seq2seq: text put before each input (T5 expects "summarize: ").')
        max_input_tokens: int | None = Field(
            None, ge=1, description="Inputs longer than this are truncated (see the `truncated` column)."
        )
        min_new_tokens: int = Field(0, ge=0, description="Shortest summary in tokens.")
        num_beams: int = Field(1, ge=1, description="Beam search width (1: greedy or sampling).")
        length_penalty: float = Field(1.0, description="Beam search: > 1 favours longer summaries.")
        no_repeat_ngram_size: int = Field(0, ge=0, description="Never repeat an n-gram of this size (0: off).")
        instruction: str = Field(
            DEFAULT_INSTRUCTION, description="Causal LMs: the prompt; {text} marks where the input goes."
        )
        chat: bool | None = Field(
            None, description="Causal LMs: use the chat template (default: when the tokenizer has one)."
        )
        system: str | None = Field(None, description="Causal LMs with chat: a system message.")

        _has_text = field_validator("instruction")(require_text_slot)

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([pa.field("summary", pa.string()), pa.field("truncated", pa.bool_())])

    def auto_class(self) -> str:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(self.context.model, trust_remote_code=self.context.trust_remote_code)
        return "AutoModelForSeq2SeqLM" if getattr(config, "is_encoder_decoder", False) else "AutoModelForCausalLM"

    def load(self) -> None:
        super().load()
        self.seq2seq = bool(getattr(self.model.config, "is_encoder_decoder", False))
        self.kv_budget = None if self.seq2seq else ready_for_decoding(self.model, self.context.gpu_share)
        o = self.options  # a causal LM without beams or n-gram bans: a unit's batches as one decode stream
        self.streams = (not self.seq2seq and o.num_beams == 1 and not o.no_repeat_ngram_size
                        and streamable(self.model, o, self.max_length))
        chat = self.options.chat
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) if chat is None else chat

    def preprocess(self, batch: Batch) -> list[Any]:
        o = self.options
        if self.seq2seq:
            items = encode(self.tokenizer, [o.prefix + t for t in batch["text"]], self.max_length, truncate=True)
            return [dict(it, seed_text=t) for it, t in zip(items, batch["text"])]
        # causal: cut the document itself to the limit, then put it in the prompt
        docs = cut_text(self.tokenizer, batch["text"], self.max_length)
        prompts = encode_prompts(self.tokenizer, [o.instruction.replace("{text}", d) for d, _ in docs], self.chat, o.system)
        return [
            {"input_ids": ids, "truncated": n > self.max_length, "seed_text": text}
            for ids, (_, n), text in zip(prompts, docs, batch["text"])
        ]

    def length(self, item: Any) -> int:
        return len(item["input_ids"]) + self.options.max_new_tokens

    def forward(self, items: list[Any]) -> list[Any]:
        o = self.options
        extra: dict[str, Any] = {"num_beams": o.num_beams, "min_new_tokens": o.min_new_tokens or None}
        if o.num_beams > 1:
            extra["length_penalty"] = o.length_penalty
        if o.no_repeat_ngram_size:
            extra["no_repeat_ngram_size"] = o.no_repeat_ngram_size
        outs = generate(self.model, self.tokenizer, items, o, seeds_from=[i["seed_text"] for i in items],
                        limits=self.batch_limits, kv_budget=self.kv_budget, **extra)
        return [(text.strip(), it["truncated"]) for (text, _), it in zip(outs, items)]

    def forward_stream(self, batches: Any) -> Any:
        # each row's truncation flag rides its key through the decode loop
        flagged = ([((key, item["truncated"]), item) for key, item in batch] for batch in batches)
        rows = generate_stream(self.model, self.tokenizer, flagged, self.options, self.batch_limits,
                               kv_budget=self.kv_budget, min_new=self.options.min_new_tokens)
        for (key, truncated), out in rows:
            yield key, out if isinstance(out, RowError) else (out[0].strip(), truncated)

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return {"summary": [o[0] for o in outputs], "truncated": [o[1] for o in outputs]}


@hookimpl
def register_tasks(register: Any) -> None:
    register(SummarizeTask)
