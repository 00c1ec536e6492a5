"""classify: label each text with a sequence-classification head (``*ForSequenceClassification``).

Scores as transformers' text-classification pipeline computes them. With a ``text_pair``
column each row is a pair of texts, tokenized together as the model was trained (a cross-encoder
reranker scores query and document; an NLI model premise and hypothesis). Labels from a causal
LM without such a head: the ``zero-shot-classify`` task.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from rayinfer import Batch, InputColumn, ModelRequirement, hookimpl
from rayinfer.text import collate, encode

from rayinfer_tasks._labels import LabelTask

ZERO_SHOT_OPTIONS = ("labels", "prompt", "label_prefix", "normalize", "chat", "system")


class ClassifyTask(LabelTask):
    name = "classify"
    description = ("Label texts, or pairs of texts (a cross-encoder reranker, NLI), with a sequence-classification "
                   "head (softmax, sigmoid or raw scores).")
    inputs = {
        "text": InputColumn("The text to label (with text_pair: the first text of the pair, e.g. the query)."),
        "text_pair": InputColumn("Optional: a second text per row, scored with the first as one pair (a query's "
                                 "document for a cross-encoder, an NLI hypothesis), as the model was trained.",
                                 optional=True),
    }
    requires = ModelRequirement(
        "AutoModelForSequenceClassification",
        architectures=("ForSequenceClassification",),
        what="a sequence-classification head",
        hint="Its head would be random: use a *ForSequenceClassification checkpoint, or task zero-shot-classify "
        "for a causal LM.",
        adapter_task_types=frozenset({"SEQ_CLS"}),
    )

    class Options(LabelTask.Options):
        function: Literal["auto", "softmax", "sigmoid", "none"] = Field(
            "auto",
            description="How logits become scores. auto: sigmoid for multi-label or single-logit models, "
            "softmax otherwise, none for regression (as transformers' pipeline does).",
        )

        @model_validator(mode="before")
        @classmethod
        def _not_zero_shot(cls, data: Any) -> Any:
            given = [k for k in ZERO_SHOT_OPTIONS if isinstance(data, dict) and k in data]
            if given:
                raise ValueError(
                    f"{', '.join(given)}: zero-shot options; classify uses the model's classification head. "
                    "For labels scored by a causal LM, use task: zero-shot-classify"
                )
            return data

    def load(self) -> None:
        super().load()
        cfg = self.model.config
        self.id2label = {int(k): str(v) for k, v in cfg.id2label.items()}
        fn = self.options.function
        if fn == "auto":
            if cfg.problem_type == "regression":
                fn = "none"
            elif cfg.problem_type == "multi_label_classification" or cfg.num_labels == 1:
                fn = "sigmoid"
            else:
                fn = "softmax"
        self.function = fn

    def preprocess(self, batch: Batch) -> list[Any]:
        return encode(self.tokenizer, batch["text"], self.max_length, self.options.truncate, pairs=batch.get("text_pair"))

    def forward(self, items: list[Any]) -> list[Any]:
        logits = self.model(**collate(items, self.tokenizer, self.model.device)).logits.float()
        if self.function == "softmax":
            logits = logits.softmax(dim=-1)
        elif self.function == "sigmoid":
            logits = logits.sigmoid()
        return list(logits.cpu().numpy())


@hookimpl
def register_tasks(register: Any) -> None:
    register(ClassifyTask)
