"""classify: label each text with a sequence-classification model."""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError

from rayinfer_tasks._encoding import encode, max_input_length, pad

LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float64())])


class ClassifyTask(Task):
    name = "classify"
    description = "Label texts with a sequence-classification model (softmax, or sigmoid for multi-label)."

    class Options(TaskOptions):
        top_k: int | None = Field(
            None, ge=1, description="Labels kept in `scores`, best first; default: all labels."
        )
        function: Literal["auto", "softmax", "sigmoid", "none"] = Field(
            "auto",
            description="How logits become scores. auto: sigmoid for multi-label or single-logit models, "
            "softmax otherwise, none for regression (as transformers' pipeline does).",
        )
        max_length: int | None = Field(None, ge=2, description="Token limit per row; default: the model's limit.")
        truncate: bool = Field(True, description="Cut rows over the limit; false: over-long rows get an error.")

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema(
            [
                pa.field("label", pa.string()),
                pa.field("score", pa.float64()),
                pa.field("scores", pa.list_(LABEL_SCORE)),
            ]
        )

    @classmethod
    def check_model_config(cls, config: dict[str, Any], options: TaskOptions) -> None:
        archs = config.get("architectures") or []
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            raise ModelError(
                f"classify needs a sequence-classification head, but the model is {', '.join(archs)}; "
                "its head would be random. Use a *ForSequenceClassification checkpoint."
            )

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification

        from rayinfer.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(self.context)
        self.model = load_model(self.context, AutoModelForSequenceClassification)
        if self.tokenizer.pad_token_id is None and self.tokenizer.eos_token_id is not None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.max_length = max_input_length(self.tokenizer, self.model, self.options.max_length)
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
        return encode(self.tokenizer, batch["text"], self.max_length, self.options.truncate)

    def forward(self, items: list[Any]) -> list[Any]:
        inputs = pad(self.tokenizer, items, self.model.device)
        logits = self.model(**inputs).logits.float()
        if self.function == "softmax":
            scores = logits.softmax(dim=-1)
        elif self.function == "sigmoid":
            scores = logits.sigmoid()
        else:
            scores = logits
        return list(scores.cpu().numpy())

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return label_columns(outputs, self.id2label, self.options.top_k)


def label_columns(outputs: list[Any], id2label: dict[int, str], top_k: int | None) -> dict[str, list[Any]]:
    """Scores per row -> label (best), score (its score) and scores (top_k, best first)."""
    labels, best, ranked = [], [], []
    for scores in outputs:
        order = sorted(range(len(scores)), key=lambda i: -float(scores[i]))
        labels.append(id2label.get(order[0], str(order[0])))
        best.append(float(scores[order[0]]))
        keep = order[:top_k] if top_k else order
        ranked.append([{"label": id2label.get(i, str(i)), "score": float(scores[i])} for i in keep])
    return {"label": labels, "score": best, "scores": ranked}


@hookimpl
def register_tasks(register: Any) -> None:
    register(ClassifyTask)
