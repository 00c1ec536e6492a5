"""nsp: next-sentence prediction with a BERT-style NSP head (BERT, NEZHA, ...).

The head was trained with label 0 = "text_pair follows text" and label 1 = "random sentence",
so ``score`` is the softmax probability of label 0 and ``is_next`` is ``score >= threshold``.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, InputColumn, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError

from rayinfer_tasks._encoding import encode, max_input_length, pad


class NextSentenceTask(Task):
    name = "nsp"
    description = "Next-sentence prediction: does text_pair follow text? (BERT/NEZHA NSP head)"
    inputs = {
        "text": InputColumn("The first sentence (segment A)."),
        "text_pair": InputColumn("The candidate next sentence (segment B)."),
    }

    class Options(TaskOptions):
        threshold: float = Field(0.5, ge=0, le=1, description="is_next is true when score >= threshold.")
        max_length: int | None = Field(None, ge=3, description="Token limit per pair; default: the model's limit.")
        truncate: bool = Field(
            True, description="Cut pairs over the limit, longest segment first; false: they get an error."
        )

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([pa.field("is_next", pa.bool_()), pa.field("score", pa.float64())])

    @classmethod
    def check_model_config(cls, config: dict[str, Any], options: TaskOptions) -> None:
        # Many BERT checkpoints (bert-base-uncased: "BertForMaskedLM") carry the NSP head's weights
        # under another architecture name; load() checks the weights themselves.
        archs = config.get("architectures") or []
        heads = ("ForNextSentencePrediction", "ForPreTraining", "ForMaskedLM", "Model")
        if archs and not any(a.endswith(heads) for a in archs):
            raise ModelError(
                f"nsp needs a next-sentence-prediction head, but the model is {', '.join(archs)}; "
                "its head would be random. Use a *ForNextSentencePrediction or *ForPreTraining checkpoint."
            )

    def load(self) -> None:
        from transformers import AutoModelForNextSentencePrediction

        from rayinfer.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(self.context)
        self.model = load_model(
            self.context, AutoModelForNextSentencePrediction, head=("seq_relationship", "next-sentence head")
        )
        self.max_length = max_input_length(self.tokenizer, self.model, self.options.max_length)

    def preprocess(self, batch: Batch) -> list[Any]:
        return encode(
            self.tokenizer, batch["text"], self.max_length, self.options.truncate, pairs=batch["text_pair"]
        )

    def forward(self, items: list[Any]) -> list[Any]:
        logits = self.model(**pad(self.tokenizer, items, self.model.device)).logits.float()
        return logits.softmax(dim=-1)[:, 0].tolist()

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return {
            "is_next": [p >= self.options.threshold for p in outputs],
            "score": [float(p) for p in outputs],
        }


@hookimpl
def register_tasks(register: Any) -> None:
    register(NextSentenceTask)
