"""What classify and zero-shot-classify share: options, and the output columns (best label, its score,
ranked scores) from one score per label."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, Task, TaskOptions

LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float64())])
LABEL_SCHEMA = pa.schema(
    [pa.field("label", pa.string()), pa.field("score", pa.float64()), pa.field("scores", pa.list_(LABEL_SCORE))]
)


class LabelOptions(TaskOptions):
    top_k: int | None = Field(None, ge=1, description="Labels kept in `scores`, best first; default: all labels.")
    max_length: int | None = Field(None, ge=2, description="Token limit per row; default: the model's limit.")
    truncate: bool = Field(True, description="Cut rows over the limit; false: over-long rows get an error.")


class LabelTask(Task):
    """A task whose ``forward`` returns one score per label, in the order of ``self.id2label``
    (set by ``load``)."""

    id2label: dict[int, str]

    class Options(LabelOptions):
        pass

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return LABEL_SCHEMA

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
