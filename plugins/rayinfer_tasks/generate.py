"""generate: continue prompts with a causal LM (Llama, Qwen, SmolLM2, GPT-NeoX-Japanese, ...)."""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from rayinfer import Batch, InputColumn, ModelRequirement, RowError, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError
from rayinfer.text import encode_prompts

from rayinfer_tasks._generation import SamplingOptions, generate, generate_batch, generate_stream, ready_for_decoding, streamable


CONSTRAINTS = ("json_schema", "regex", "choices")  # the options that constrain the output (one at most)


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
        json_schema: dict[str, Any] | None = Field(
            None, description="Every output is JSON that fits this schema (json.dumps' layout); "
            "rows that cannot within max_new_tokens are constraint_unmet errors.")
        regex: str | None = Field(None, description="Every output matches this regular expression, whole.")
        choices: list[str] | None = Field(None, description="Every output is one of these strings.")
        engine: Literal["rayinfer", "transformers"] = Field(
            "rayinfer", description="rayinfer: its own decode loop (continuous batching, per-row seeds, constraints, "
            "penalties). transformers: transformers' continuous batching (generate_batch, paged attention), "
            "without per-row seeds, constraints or a repetition penalty.")

        @model_validator(mode="after")
        def _one_constraint(self) -> GenerateTask.Options:
            if self.engine == "transformers":
                unsupported = [name for name, on in (("seed", self.seed is not None),
                                                     ("repetition_penalty", self.repetition_penalty != 1.0),
                                                     *((k, getattr(self, k) is not None) for k in CONSTRAINTS)) if on]
                if unsupported:
                    raise ValueError(f"engine: transformers has no {', '.join(unsupported)} (its generate_batch draws "
                                     "no per-row seed and takes no logits processors); use engine: rayinfer for them")
            given = [k for k in CONSTRAINTS if getattr(self, k) is not None]
            if len(given) > 1:
                raise ValueError(f"give at most one of json_schema, regex, choices (got {', '.join(given)})")
            if given and self.stop:
                raise ValueError(f"stop cannot be combined with {given[0]}: a constrained output ends where "
                                 "the constraint completes")
            if given:
                from rayinfer.constraints import ConstraintError, grammar

                try:
                    grammar(**{given[0]: getattr(self, given[0])})
                except ConstraintError as exc:
                    raise ValueError(f"{given[0]}: {exc}") from None
            return self

        def constraint(self) -> tuple[str, Any] | None:
            """The constraint asked for, as (option, value), or None."""
            return next(((k, getattr(self, k)) for k in CONSTRAINTS if getattr(self, k) is not None), None)

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([pa.field("generated", pa.string()), pa.field("num_tokens", pa.int32())])

    def load(self) -> None:
        super().load()
        self.kv_budget = ready_for_decoding(self.model, self.context.gpu_share)
        # a unit's batches as one stream through the decode loop (rows join as slots free)
        self.streams = self.options.engine == "rayinfer" and streamable(self.model, self.options, self.max_length)
        self.constraint = None
        asked = self.options.constraint()
        if asked is not None:
            from rayinfer.constraints import Constraint, ConstraintError, grammar

            kind, value = asked
            vocab = int(getattr(self.model.config.get_text_config(), "vocab_size", 0) or len(self.tokenizer))
            try:
                self.constraint = Constraint(self.tokenizer, grammar(**{kind: value}), vocab,
                                             [self.tokenizer.eos_token_id], kind=kind)
            except ConstraintError as exc:
                raise ModelError(f"{kind}: {exc}") from None

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
        if self.options.engine == "transformers":
            return generate_batch(self.model, self.tokenizer, items, self.options)
        return generate(self.model, self.tokenizer, items, self.options, seeds_from=[i["seed_text"] for i in items],
                        limits=self.batch_limits, constraint=self.constraint, kv_budget=self.kv_budget)

    def forward_stream(self, batches: Any) -> Any:
        return generate_stream(self.model, self.tokenizer, batches, self.options, self.batch_limits,
                               constraint=self.constraint, kv_budget=self.kv_budget)

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return {"generated": [o[0] for o in outputs], "num_tokens": [o[1] for o in outputs]}


@hookimpl
def register_tasks(register: Any) -> None:
    register(GenerateTask)
