"""summarize: seq2seq models (T5, BART) with a source prefix, or causal LMs through a prompt."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field, field_validator

from rayinfer import Batch, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError

from rayinfer_tasks._encoding import encode, max_input_length, require_text_slot
from rayinfer_tasks._generation import SamplingOptions, ensure_pad_token, generate
from rayinfer_tasks.generate import chat_prompt

DEFAULT_INSTRUCTION = "Summarize the following text in one or two sentences.\n\n{text}"


class SummarizeTask(Task):
    name = "summarize"
    # Documents are long, so the prompt pass dominates: smaller passes than generate's
    # (SmolLM2, 64 documents of ~200 tokens: 4096 -> 1.31, 8192 -> 1.22, 16384 -> 0.79 rows/s).
    cpu_batch_tokens = 4096
    description = "Summarize texts: seq2seq (T5/BART, with a prefix) or a causal LM prompted by an instruction."

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

    @classmethod
    def check_model_config(cls, config: dict[str, Any], options: TaskOptions) -> None:
        archs = config.get("architectures") or []
        ok = config.get("is_encoder_decoder") or any(
            a.endswith(("ForCausalLM", "ForConditionalGeneration")) for a in archs
        )
        if archs and not ok:
            raise ModelError(f"summarize needs a seq2seq or causal LM, but the model is {', '.join(archs)}")

    @classmethod
    def adapter_task_types(cls, options: TaskOptions) -> set[str] | None:
        return {"CAUSAL_LM", "SEQ_2_SEQ_LM"}

    def load(self) -> None:
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

        from rayinfer.models import load_model, load_tokenizer

        config = AutoConfig.from_pretrained(self.context.model, trust_remote_code=self.context.trust_remote_code)
        self.seq2seq = bool(getattr(config, "is_encoder_decoder", False))
        self.tokenizer = load_tokenizer(self.context)
        self.model = load_model(self.context, AutoModelForSeq2SeqLM if self.seq2seq else AutoModelForCausalLM)
        ensure_pad_token(self.tokenizer, self.model)
        self.limit = max_input_length(self.tokenizer, self.model, self.options.max_input_tokens)
        chat = self.options.chat
        self.chat = bool(getattr(self.tokenizer, "chat_template", None)) if chat is None else chat

    def preprocess(self, batch: Batch) -> list[Any]:
        o = self.options
        if self.seq2seq:
            items = encode(self.tokenizer, [o.prefix + t for t in batch["text"]], self.limit, truncate=True)
            return [dict(it, seed_text=t) if isinstance(it, dict) else it for it, t in zip(items, batch["text"])]
        # causal: cut the document itself to the limit, then put it in the prompt
        docs = self.tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]
        items = []
        for text, ids in zip(batch["text"], docs):
            truncated = len(ids) > self.limit
            doc = self.tokenizer.decode(ids[: self.limit]) if truncated else text
            user = o.instruction.replace("{text}", doc)
            prompt = chat_prompt(self.tokenizer, user, o.system) if self.chat else user
            enc = self.tokenizer(prompt, add_special_tokens=not self.chat)["input_ids"]
            items.append({"input_ids": enc, "attention_mask": [1] * len(enc), "truncated": truncated, "seed_text": text})
        return items

    def length(self, item: Any) -> int:
        return len(item["input_ids"]) + self.options.max_new_tokens

    def forward(self, items: list[Any]) -> list[Any]:
        o = self.options
        extra: dict[str, Any] = {"num_beams": o.num_beams, "min_new_tokens": o.min_new_tokens or None}
        if o.num_beams > 1:
            extra["length_penalty"] = o.length_penalty
        if o.no_repeat_ngram_size:
            extra["no_repeat_ngram_size"] = o.no_repeat_ngram_size
        clean = [{k: v for k, v in it.items() if k in ("input_ids", "attention_mask")} for it in items]
        outs = generate(self.model, self.tokenizer, clean, o, seeds_from=[i["seed_text"] for i in items], **extra)
        return [(text.strip(), it["truncated"]) for (text, _), it in zip(outs, items)]

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return {"summary": [o[0] for o in outputs], "truncated": [o[1] for o in outputs]}


@hookimpl
def register_tasks(register: Any) -> None:
    register(SummarizeTask)
