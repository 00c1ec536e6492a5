"""fill-mask: predict the tokens behind each mask token of a text (BERT-style masked LMs)."""

from __future__ import annotations

import re
from typing import Any

import pyarrow as pa
from pydantic import Field

from rayinfer import Batch, ModelRequirement, RowError, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError
from rayinfer.text import collate, encode

CANDIDATE = pa.struct([("token_id", pa.int64()), ("token", pa.string()), ("score", pa.float64())])


class FillMaskTask(Task):
    name = "fill-mask"
    description = "Predict the masked tokens of a text with a masked language model (BERT, RoBERTa, NEZHA, ...)."
    requires = ModelRequirement(
        "AutoModelForMaskedLM",
        architectures=("ForMaskedLM", "ForPreTraining", "ForMaskedLMWithHead"),
        what="a masked-LM head (*ForMaskedLM / *ForPreTraining)",
    )

    class Options(TaskOptions):
        top_k: int = Field(5, ge=1, le=1000, description="Candidates kept per mask token, best first.")
        max_length: int | None = Field(
            None, ge=2, description="Token limit per row; default: the model's limit."
        )
        truncate: bool = Field(
            True,
            description="Cut rows over the limit (a row whose mask would be cut off gets an error); "
            "false: every over-long row gets an error.",
        )

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        return pa.schema(
            [
                pa.field("predictions", pa.list_(pa.list_(CANDIDATE))),
                pa.field("filled", pa.string()),
            ]
        )

    def load(self) -> None:
        super().load()
        if self.tokenizer.mask_token_id is None:
            raise ModelError(f"the tokenizer of {self.context.model!r} has no mask token")
        self._token_text: dict[int, str] = {}
        self._split = split_mlm_head(self.model)

    def preprocess(self, batch: Batch) -> list[Any]:
        texts = batch["text"]
        mask = self.tokenizer.mask_token
        items = encode(self.tokenizer, texts, self.max_length, self.options.truncate)
        mask_id = self.tokenizer.mask_token_id
        out: list[Any] = []
        for text, item in zip(texts, items):
            if isinstance(item, RowError):
                out.append(item)
                continue
            found = sum(1 for t in item["input_ids"] if t == mask_id)
            expected = text.count(mask)
            if expected == 0:
                out.append(RowError(f"no {mask} token in the text", "no_mask"))
            elif found < expected:
                out.append(RowError(f"a {mask} token lies beyond the {self.max_length}-token limit", "too_long"))
            else:
                out.append(item)
        return out

    def forward(self, items: list[Any]) -> list[Any]:
        import torch

        inputs = collate(items, self.tokenizer, self.model.device)
        rows, cols = torch.nonzero(inputs["input_ids"] == self.tokenizer.mask_token_id, as_tuple=True)
        if self._split is not None:  # the vocabulary projection only where the masks are
            base, head = self._split
            hidden = base(**inputs).last_hidden_state
            logits = head(hidden[rows, cols])
        else:
            logits = self.model(**inputs).logits[rows, cols]
        probs = logits.float().softmax(dim=-1)
        k = min(self.options.top_k, probs.shape[-1])
        values, indices = probs.topk(k)
        per_row: list[list[tuple[list[int], list[float]]]] = [[] for _ in items]
        for r, v, i in zip(rows.tolist(), values.tolist(), indices.tolist()):
            per_row[r].append((i, v))
        return per_row

    def _text(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        predictions, filled = [], []
        mask = self.tokenizer.mask_token
        for text, masks in zip(batch["text"], outputs):
            row = [
                [{"token_id": t, "token": self._text(t), "score": s} for t, s in zip(ids, scores)]
                for ids, scores in masks
            ]
            predictions.append(row)
            filled.append(fill_text(text, mask, [cands[0]["token"] for cands in row]))
        return {"predictions": predictions, "filled": filled}


def split_mlm_head(model: Any) -> tuple[Any, Any] | None:
    """(encoder, MLM head) of BERT-like masked LMs (``cls`` or ``lm_head`` beside the base model),
    so the vocabulary projection, a third of an encoder's work, runs on mask positions only. None
    (the whole model runs) for other layouts."""
    from torch import nn

    base = getattr(model, getattr(model, "base_model_prefix", ""), None)
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(base, nn.Module) and isinstance(head, nn.Module) and type(head).forward is not nn.Module.forward:
            return base, head
    return None


def fill_text(text: str, mask: str, tokens: list[str]) -> str:
    """Replace each mask in ``text``, in order, by its token; a WordPiece continuation ("##s")
    joins the word before it."""
    parts = text.split(mask)
    out = [parts[0]]
    for token, rest in zip(tokens, parts[1:]):
        token = token.strip()
        if token.startswith("##"):
            out[-1] = re.sub(r"\s+$", "", out[-1])
            token = token[2:]
        out.append(token)
        out.append(rest)
    return "".join(out) + "".join(mask + p for p in parts[len(tokens) + 1 :])


@hookimpl
def register_tasks(register: Any) -> None:
    register(FillMaskTask)
