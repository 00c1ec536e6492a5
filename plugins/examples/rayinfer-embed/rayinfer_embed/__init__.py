"""embed: one fixed-size vector per text, the mean of the encoder's last hidden states over the
text's tokens (padding excluded), optionally L2-normalised: what sentence-transformers models
such as all-MiniLM-L6-v2 are trained for."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError


class EmbedTask(Task):
    name = "embed"
    description = "Sentence embeddings: mean-pooled last hidden states of an encoder (e.g. all-MiniLM-L6-v2)."

    class Options(TaskOptions):
        normalize: bool = Field(True, description="Scale each vector to unit length (for cosine similarity).")
        max_length: int | None = Field(None, ge=2, description="Token limit per row; longer rows are cut.")

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema([pa.field("embedding", pa.list_(pa.float32())), pa.field("truncated", pa.bool_())])

    @classmethod
    def check_model_config(cls, config: dict[str, Any], options: TaskOptions) -> None:
        if config.get("is_encoder_decoder"):
            raise ModelError("embed needs an encoder (BERT-style); this model is an encoder-decoder")

    def load(self) -> None:
        # heavy imports belong here, not at module level: `rayinfer tasks` must stay fast
        from transformers import AutoModel

        from rayinfer.models import load_model, load_tokenizer

        self.tokenizer = load_tokenizer(self.context)
        self.model = load_model(self.context, AutoModel)
        limit = self.options.max_length or self.tokenizer.model_max_length
        self.max_length = min(limit, getattr(self.model.config, "max_position_embeddings", limit))

    def preprocess(self, batch: Batch) -> list[Any]:
        enc = self.tokenizer(batch["text"], truncation=False, verbose=False)
        items = []
        for ids, types in zip(enc["input_ids"], enc.get("token_type_ids", enc["input_ids"])):
            cut = len(ids) > self.max_length
            if cut:  # keep the head and the closing [SEP]
                ids, types = ids[: self.max_length - 1] + ids[-1:], types[: self.max_length]
            items.append({"input_ids": ids, "token_type_ids": types, "truncated": cut})
        return items

    def forward(self, items: list[Any]) -> list[Any]:
        import torch

        longest = max(len(it["input_ids"]) for it in items)
        pad = self.tokenizer.pad_token_id or 0
        ids = torch.tensor([it["input_ids"] + [pad] * (longest - len(it["input_ids"])) for it in items])
        mask = torch.tensor([[1] * len(it["input_ids"]) + [0] * (longest - len(it["input_ids"])) for it in items])
        inputs = {"input_ids": ids.to(self.model.device), "attention_mask": mask.to(self.model.device)}
        if "token_type_ids" in self.tokenizer.model_input_names:
            types = [it["token_type_ids"] + [0] * (longest - len(it["token_type_ids"])) for it in items]
            inputs["token_type_ids"] = torch.tensor(types, device=self.model.device)
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
