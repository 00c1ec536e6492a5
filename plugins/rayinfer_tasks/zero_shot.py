"""zero-shot-classify: label texts with a causal LM, no classification head needed.

Each label is scored by the log-likelihood the model gives the label's tokens right after the
prompt (``prompt`` with the row's text in it), averaged per label token by default; ``scores``
are the softmax of those log-likelihoods over the labels. The prompt and each label are
tokenized separately, so every label continues exactly the same prompt tokens.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from rayinfer import Batch, ModelRequirement, RowError, hookimpl
from rayinfer.errors import ModelError
from rayinfer.text import continuation_logprobs, cut_text, encode_prompts, pad_id, require_text_slot

from rayinfer_tasks._labels import LabelTask


class ZeroShotClassifyTask(LabelTask):
    name = "zero-shot-classify"
    description = "Label texts with a causal LM: each candidate label scored by its log-likelihood after a prompt."
    requires = ModelRequirement(
        "AutoModelForCausalLM",
        architectures=("ForCausalLM",),
        what="a causal LM (*ForCausalLM)",
        hint="For a model with a classification head, use task: classify.",
        encoder_decoder=False,
        adapter_task_types=frozenset({"CAUSAL_LM"}),
    )

    class Options(LabelTask.Options):
        labels: list[str] = Field(min_length=2, description="The candidate labels (at least two, distinct).")
        prompt: str = Field(
            "Text: {text}\nLabel:",
            description="The prompt before the label; {text} marks the input, {labels} (optional) lists the "
            "labels comma-separated.",
        )
        label_prefix: str = Field(" ", description="Text put before each label (usually a space).")
        normalize: Literal["mean", "sum"] = Field(
            "mean",
            description="A label's score is the mean (fair to labels of several tokens) or the sum of its "
            "tokens' log-probabilities.",
        )
        chat: bool = Field(False, description="Put the prompt in the chat template as a user message.")
        system: str | None = Field(None, description="With chat: a system message.")

        _has_text = field_validator("prompt")(require_text_slot)

        @field_validator("labels")
        @classmethod
        def _distinct(cls, value: list[str]) -> list[str]:
            if len(set(value)) != len(value) or not all(v.strip() for v in value):
                raise ValueError("labels must be distinct and not empty")
            return value

    def load(self) -> None:
        super().load()
        o = self.options
        self.id2label = dict(enumerate(o.labels))
        self.label_ids = encode_labels(self.tokenizer, o.labels, o.label_prefix)
        self.template = o.prompt.replace("{labels}", ", ".join(o.labels))
        overhead = len(self._prompt_ids([""])[0]) + max(len(ids) for ids in self.label_ids)
        self.text_limit = self.max_length - overhead
        if self.text_limit < 1:
            raise ModelError(f"the prompt and labels alone take {overhead} tokens, over the limit of {self.max_length}")

    def _prompt_ids(self, texts: list[str]) -> list[list[int]]:
        prompts = [self.template.replace("{text}", t) for t in texts]
        return encode_prompts(self.tokenizer, prompts, self.options.chat, self.options.system)

    def preprocess(self, batch: Batch) -> list[Any]:
        cut = cut_text(self.tokenizer, batch["text"], self.text_limit)
        over = [n > self.text_limit and not self.options.truncate for _, n in cut]
        prompts = iter(self._prompt_ids([text for (text, _), skip in zip(cut, over) if not skip]))
        return [
            RowError(f"input is {n} tokens, over the {self.text_limit} left by the prompt and labels", "too_long")
            if skip else {"input_ids": next(prompts)}
            for (_, n), skip in zip(cut, over)
        ]

    def length(self, item: Any) -> int:
        return sum(len(item["input_ids"]) + len(ids) for ids in self.label_ids)

    def forward(self, items: list[Any]) -> list[Any]:
        import torch

        prefixes = [it["input_ids"] for it in items for _ in self.label_ids]
        lls = continuation_logprobs(self.model, prefixes, self.label_ids * len(items), pad_id(self.tokenizer))
        if self.options.normalize == "mean":
            lls = [ll / len(ids) for ll, ids in zip(lls, self.label_ids * len(items))]
        per_row = torch.tensor(lls, dtype=torch.float64).view(len(items), len(self.label_ids))
        return list(per_row.softmax(dim=-1).numpy())


def encode_labels(tokenizer: Any, labels: list[str], prefix: str) -> list[list[int]]:
    ids = tokenizer([prefix + label for label in labels], add_special_tokens=False)["input_ids"]
    for label, row in zip(labels, ids):
        if not row:
            raise ModelError(f"label {label!r} encodes to no tokens")
    return ids


@hookimpl
def register_tasks(register: Any) -> None:
    register(ZeroShotClassifyTask)
