"""nsp: next-sentence prediction with a BERT-style NSP head (BERT, NEZHA, ...).

The head was trained with label 0 = "text_pair follows text" and label 1 = "random sentence",
so ``score`` is the softmax probability of label 0 and ``is_next`` is ``score >= threshold``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, InputColumn, ModelRequirement, Task, TaskOptions, hookimpl
from rayinfer.text import collate, encode


class NextSentenceTask(Task):
    name = "nsp"
    description = "Next-sentence prediction: does text_pair follow text? (BERT/NEZHA NSP head)"
    inputs = {
        "text": InputColumn("The first sentence (segment A)."),
        "text_pair": InputColumn("The candidate next sentence (segment B)."),
    }
    # Many BERT checkpoints (bert-base-uncased: "BertForMaskedLM") carry the NSP head's weights
    # under another architecture name: the architectures are a first filter, `head` checks the
    # weights themselves when they load.
    requires = ModelRequirement(
        "AutoModelForNextSentencePrediction",
        architectures=("ForNextSentencePrediction", "ForPreTraining", "ForMaskedLM", "Model"),
        what="a next-sentence-prediction head",
        hint="Its head would be random: use a *ForNextSentencePrediction or *ForPreTraining checkpoint.",
        head=("seq_relationship", "next-sentence head"),
    )

    class Options(TaskOptions):
        threshold: float = Field(0.5, ge=0, le=1, description="is_next is true when score >= threshold.")
        max_length: int | None = Field(None, ge=3, description="Token limit per pair; default: the model's limit.")
        truncate: bool = Field(
            True, description="Cut pairs over the limit, longest segment first; false: they get an error."
        )

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([pa.field("is_next", pa.bool_()), pa.field("score", pa.float64())])

    def preprocess(self, batch: Batch) -> list[Any]:
        return encode(
            self.tokenizer, batch["text"], self.max_length, self.options.truncate, pairs=batch["text_pair"]
        )

    def forward(self, items: list[Any]) -> list[Any]:
        logits = self.model(**collate(items, self.tokenizer, self.model.device)).logits.float()
        return logits.softmax(dim=-1)[:, 0].tolist()

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return {
            "is_next": [p >= self.options.threshold for p in outputs],
            "score": [float(p) for p in outputs],
        }


@hookimpl
def register_tasks(register: Any) -> None:
    register(NextSentenceTask)
