"""mean-embed: one fixed-size vector per text, the mean of the encoder's last hidden states over the
text's tokens (padding excluded), optionally L2-normalised. A plugin written as a tutorial: the
built-in ``embed`` task runs a model's own sentence-transformers modules (CLS or last-token
pooling, Dense, prompts), which mean pooling alone gets wrong for many models."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, ModelRequirement, Task, TaskOptions, hookimpl
from rayinfer.text import collate, encode


class EmbedTask(Task):
    name = "mean-embed"
    description = "Sentence embeddings: mean-pooled last hidden states of an encoder (e.g. all-MiniLM-L6-v2)."
    # The base class loads tokenizer and model from this (self.tokenizer, self.model,
    # self.max_length) and refuses an encoder-decoder before Ray starts.
    requires = ModelRequirement("AutoModel", what="an encoder (BERT-style)", encoder_decoder=False)

    class Options(TaskOptions):
        normalize: bool = Field(True, description="Scale each vector to unit length (for cosine similarity).")
        max_length: int | None = Field(None, ge=2, description="Token limit per row; longer rows are cut.")

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([pa.field("embedding", pa.list_(pa.float32())), pa.field("truncated", pa.bool_())])

    def preprocess(self, batch: Batch) -> list[Any]:
        # one item per row, cut to max_length with its closing [SEP] kept, flagged `truncated`
        return encode(self.tokenizer, batch["text"], self.max_length, truncate=True)

    def forward(self, items: list[Any]) -> list[Any]:
        import torch  # heavy imports inside methods: `rayinfer tasks` must stay fast

        inputs = collate(items, self.tokenizer, self.model.device)
        hidden = self.model(**inputs).last_hidden_state.float()
        weights = inputs["attention_mask"].unsqueeze(-1).float()
        vectors = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        if self.options.normalize:
            vectors = torch.nn.functional.normalize(vectors, dim=-1)
        return [(v, it["truncated"]) for v, it in zip(vectors.cpu().numpy(), items)]

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        return {"embedding": [v.tolist() for v, _ in outputs], "truncated": [t for _, t in outputs]}


@hookimpl
def register_tasks(register: Any) -> None:
    register(EmbedTask)
