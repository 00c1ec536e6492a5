"""generate: continue prompts with a causal LM (Llama, Qwen, SmolLM2, GPT-NeoX-Japanese, ...)."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, InputColumn, ModelRequirement, RowError, Task, TaskOptions, hookimpl
from rayinfer.text import encode_prompts

from rayinfer_tasks._generation import SamplingOptions, generate, ready_for_decoding


class GenerateTask(Task):
    name = "generate"
    # A decode batch is cut by rows (32 on CPU actors: rayinfer.run.cluster.CPU_DECODE_ROWS); the
    # token budget (rows x (prompt + max_new_tokens)) only bounds its KV cache (16384 tokens of
    # SmolLM2: ~750 MB). 48 chat prompts x 128 new tokens: 8192 cut them 28 + 20, 16384 lets 32 + 16.
    cpu_batch_tokens = 16384
    decodes = True
    schedules = True  # forward gets all of a batch's rows: continuous batching (rayinfer.decoding)
    description = "Generate text from prompts with a causal LM (chat templates, greedy or seeded sampling)."
    inputs = {"prompt": InputColumn("The prompt (the user message when chat is on).")}
    requires = ModelRequirement(
        "AutoModelForCausalLM",
        architectures=("ForCausalLM",),
        what="a causal LM (*ForCausalLM)",
        encoder_decoder=False,
        adapter_task_types=frozenset({"CAUSAL_LM"}),
    )
    max_length_option = "max_input_tokens"

    class Options(SamplingOptions):
        chat: bool = Field(False, description="Wrap each prompt in the model's chat template as a user message.")
        system: str | None = Field(None, description="A system message (with chat).")
        max_input_tokens: int | None = Field(None, ge=1, description="Longest prompt in tokens; default: the model's limit.")

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([pa.field("generated", pa.string()), pa.field("num_tokens", pa.int32())])

    def load(self) -> None:
        super().load()
        ready_for_decoding(self.model)

    def preprocess(self, batch: Batch) -> list[Any]:
        encoded = encode_prompts(self.tokenizer, batch["prompt"], self.options.chat, self.options.system)
        return [
            RowError(f"prompt is {len(ids)} tokens, over the limit of {self.max_length}", "too_long")
            if len(ids) > self.max_length else {"input_ids": ids, "seed_text": prompt}
            for prompt, ids in zip(batch["prompt"], encoded)
        ]

    def length(self, item: Any) -> int:
        return len(item["input_ids"]) + self.options.max_new_tokens

    def forward(self, items: list[Any]) -> list[Any]:
        return generate(self.model, self.tokenizer, items, self.options, seeds_from=[i["seed_text"] for i in items],
                        limits=self.batch_limits)

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return {"generated": [o[0] for o in outputs], "num_tokens": [o[1] for o in outputs]}


@hookimpl
def register_tasks(register: Any) -> None:
    register(GenerateTask)
