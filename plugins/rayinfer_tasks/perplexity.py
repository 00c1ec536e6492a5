"""perplexity: how likely a causal LM finds each text, e.g. to filter a corpus (noise scores high).

Every token is scored given all before it but the first (``add_bos`` puts BOS first to score it
too). A text over the window is cut, or with ``stride`` scored in overlapping windows as in
transformers' perplexity guide, each scoring its new tokens after up to max_length - stride others."""

from __future__ import annotations

import math
from typing import Any

import pyarrow as pa
from pydantic import Field, model_validator

from rayinfer import Batch, ModelRequirement, RowError, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError
from rayinfer.text import continuation_logprobs, pad_id, sliding_windows


class PerplexityTask(Task):
    name = "perplexity"
    description = "Score texts by a causal LM's perplexity (mean token NLL), e.g. to filter a corpus."
    full_logits = True  # every token's vocabulary logits: counted in an actor's memory
    requires = ModelRequirement("AutoModelForCausalLM", architectures=("ForCausalLM",), what="a causal LM",
                                encoder_decoder=False, adapter_task_types=frozenset({"CAUSAL_LM"}))

    class Options(TaskOptions):
        max_length: int | None = Field(None, ge=2, description="Tokens per window; default: the model's limit.")
        add_bos: bool | None = Field(None, description="Put BOS first so the first token is scored too; default: "
                                     "when the tokenizer has a BOS token.")
        stride: int | None = Field(None, ge=1, description="Score longer texts in windows that each add this many "
                                   "tokens (under max_length); unset: longer texts are cut (see `truncated`).")

        @model_validator(mode="after")
        def _context_left(self) -> Any:
            return check_stride(self.stride, self.max_length, ValueError) or self

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([("nll", pa.float64()), ("perplexity", pa.float64()), ("tokens", pa.int32()),
                          ("truncated", pa.bool_())])

    def load(self) -> None:
        super().load()
        bos, add = self.tokenizer.bos_token_id, self.options.add_bos
        if add and bos is None:
            raise ModelError(f"add_bos: true, but the tokenizer of {self.context.model!r} has no BOS token")
        self.bos = [bos] if bos is not None and add is not False else []
        check_stride(self.options.stride, self.max_length, ModelError)

    def preprocess(self, batch: Batch) -> list[Any]:
        items: list[Any] = []
        for ids in self.tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]:
            ids = self.bos + ids
            cut = self.options.stride is None and len(ids) > self.max_length
            ids = ids[: self.max_length] if cut else ids
            items.append({"windows": sliding_windows(ids, self.max_length, self.options.stride), "truncated": cut}
                         if len(ids) > 1 else RowError("one token: nothing to score (add_bos scores it)", "too_short"))
        return items

    def length(self, item: Any) -> int:
        return sum(len(context) + len(scored) for context, scored in item["windows"])

    def forward(self, items: list[Any]) -> list[Any]:
        contexts, scored = zip(*[w for it in items for w in it["windows"]])
        lls = iter(continuation_logprobs(self.model, contexts, scored, pad_id(self.tokenizer)))
        counts = [sum(len(s) for _, s in it["windows"]) for it in items]
        return [(-sum(next(lls) for _ in it["windows"]) / n, n, it["truncated"]) for it, n in zip(items, counts)]

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        nll, tokens, truncated = (list(col) for col in zip(*outputs))
        return {"nll": nll, "perplexity": [math.exp(x) for x in nll], "tokens": tokens, "truncated": truncated}


def check_stride(stride: int | None, max_length: int | None, error: type[Exception]) -> None:
    if stride and max_length and stride >= max_length:
        raise error(f"stride {stride} leaves no context in a window of {max_length} tokens")


@hookimpl
def register_tasks(register: Any) -> None:
    register(PerplexityTask)
