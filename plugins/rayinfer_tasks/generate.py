"""generate: continue prompts with a causal LM (Llama, Qwen, SmolLM2, GPT-NeoX-Japanese, ...)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, InputColumn, RowError, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError

from rayinfer_tasks._encoding import max_input_length
from rayinfer_tasks._generation import SamplingOptions, ensure_pad_token, generate


def check_causal(config: dict[str, Any], task: str) -> None:
    archs = config.get("architectures") or []
    if config.get("is_encoder_decoder") or (archs and not any(a.endswith("ForCausalLM") for a in archs)):
        raise ModelError(f"{task} needs a causal LM (*ForCausalLM), but the model is {', '.join(archs) or config.get('model_type')}")


def chat_prompt(tokenizer: Any, user: str, system: str | None) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("chat: true, but the tokenizer has no chat template; set chat: false and write the prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


class GenerateTask(Task):
    name = "generate"
    # On CPUs a decode step costs about the same for 8 rows as for 64, so generation wants far more
    # rows per pass than encoders; past ~8k padded tokens the prompt pass itself slows down
    # (SmolLM2 prompts of ~60 tokens: 4096 -> 4.5, 8192 -> 4.8, 16384 -> 4.1 rows/s).
    cpu_batch_tokens = 8192
    description = "Generate text from prompts with a causal LM (chat templates, greedy or seeded sampling)."
    inputs = {"prompt": InputColumn("The prompt (the user message when chat is on).")}

    class Options(SamplingOptions):
        chat: bool = Field(False, description="Wrap each prompt in the model's chat template as a user message.")
        system: str | None = Field(None, description="A system message (with chat).")
        max_input_tokens: int | None = Field(None, ge=1, description="Longest prompt in tokens; default: the model's limit.")

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([pa.field("generated", pa.string()), pa.field("num_tokens", pa.int32())])

    @classmethod
    def check_model_config(cls, config: dict[str, Any], options: TaskOptions) -> None:
        check_causal(config, cls.name)

    @classmethod
    def adapter_task_types(cls, options: TaskOptions) -> set[str] | None:
        return {"CAUSAL_LM"}

    def load(self) -> None:
        from transformers import AutoModelForCausalLM

        from rayinfer.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(self.context)
        self.model = load_model(self.context, AutoModelForCausalLM)
        ensure_pad_token(self.tokenizer, self.model)
        self.limit = max_input_length(self.tokenizer, self.model, self.options.max_input_tokens)

    def preprocess(self, batch: Batch) -> list[Any]:
        o = self.options
        prompts = [chat_prompt(self.tokenizer, p, o.system) if o.chat else p for p in batch["prompt"]]
        enc = self.tokenizer(prompts, add_special_tokens=not o.chat, verbose=False)
        items: list[Any] = []
        for prompt, ids in zip(batch["prompt"], enc["input_ids"]):
            if len(ids) > self.limit:
                items.append(RowError(f"prompt is {len(ids)} tokens, over the limit of {self.limit}", "too_long"))
            else:
                items.append({"input_ids": ids, "attention_mask": [1] * len(ids), "seed_text": prompt})
        return items

    def length(self, item: Any) -> int:
        return len(item["input_ids"]) + self.options.max_new_tokens

    def forward(self, items: list[Any]) -> list[Any]:
        return generate(self.model, self.tokenizer, items, self.options, seeds_from=[i["seed_text"] for i in items])

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return {"generated": [o[0] for o in outputs], "num_tokens": [o[1] for o in outputs]}


@hookimpl
def register_tasks(register: Any) -> None:
    register(GenerateTask)
