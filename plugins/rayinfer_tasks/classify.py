"""classify: label each text with a sequence-classification model, or zero-shot with a causal LM.

Zero-shot (``labels`` set): each label is scored by the log-likelihood a causal LM gives the
label text right after the prompt (``prompt`` with the row's text in it), averaged per label
token by default; ``scores`` are the softmax of those log-likelihoods over the labels.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, field_validator, model_validator

from rayinfer import Batch, RowError, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError

from rayinfer_tasks._encoding import encode, max_input_length, pad, require_text_slot

LABEL_SCORE = pa.struct([("label", pa.string()), ("score", pa.float64())])


class ClassifyTask(Task):
    name = "classify"
    description = "Label texts: a sequence-classification head, or zero-shot label log-likelihoods under a causal LM."

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
        labels: list[str] | None = Field(
            None,
            min_length=2,
            description="Zero-shot with a causal LM: the candidate labels, each scored by its log-likelihood "
            "after the prompt. Unset: the model's own classification head.",
        )
        prompt: str = Field(
            "Text: {text}\nLabel:",
            description="Zero-shot: the prompt before the label; {text} marks the input, {labels} (optional) "
            "lists the labels comma-separated.",
        )
        label_prefix: str = Field(" ", description="Zero-shot: text put before each label (usually a space).")
        normalize: Literal["mean", "sum"] = Field(
            "mean",
            description="Zero-shot: a label's score is the mean (fair to labels of several tokens) or the sum "
            "of its tokens' log-probabilities.",
        )
        chat: bool = Field(False, description="Zero-shot: put the prompt in the chat template as a user message.")
        system: str | None = Field(None, description="Zero-shot with chat: a system message.")

        _has_text = field_validator("prompt")(require_text_slot)

        @field_validator("labels")
        @classmethod
        def _distinct(cls, value: list[str] | None) -> list[str] | None:
            if value is not None and (len(set(value)) != len(value) or not all(v.strip() for v in value)):
                raise ValueError("labels must be distinct and not empty")
            return value

        @model_validator(mode="after")
        def _zero_shot_scores(self) -> "ClassifyTask.Options":
            if self.labels is not None and self.function not in ("auto", "softmax"):
                raise ValueError("zero-shot scores are a softmax over the labels; leave function at auto")
            return self

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
        if getattr(options, "labels", None):
            if config.get("is_encoder_decoder") or (archs and not any(a.endswith("ForCausalLM") for a in archs)):
                raise ModelError(
                    f"zero-shot classify (options.labels) needs a causal LM, but the model is {', '.join(archs)}"
                )
            return
        if archs and not any(a.endswith("ForSequenceClassification") for a in archs):
            hint = (
                " For a causal LM, give options.labels for zero-shot classification."
                if any(a.endswith("ForCausalLM") for a in archs) else ""
            )
            raise ModelError(
                f"classify needs a sequence-classification head, but the model is {', '.join(archs)}; "
                f"its head would be random. Use a *ForSequenceClassification checkpoint.{hint}"
            )

    @classmethod
    def adapter_task_types(cls, options: TaskOptions) -> set[str] | None:
        return {"CAUSAL_LM"} if getattr(options, "labels", None) else {"SEQ_CLS"}

    def load(self) -> None:
        if self.options.labels:
            self.zero_shot: ZeroShot | None = ZeroShot(self.context, self.options)
            return
        self.zero_shot = None
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
        if self.zero_shot:
            return self.zero_shot.preprocess(batch["text"])
        return encode(self.tokenizer, batch["text"], self.max_length, self.options.truncate)

    def length(self, item: Any) -> int:
        if self.zero_shot:
            return self.zero_shot.length(item)
        return super().length(item)

    def forward(self, items: list[Any]) -> list[Any]:
        if self.zero_shot:
            return self.zero_shot.forward(items)
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
        id2label = dict(enumerate(self.options.labels)) if self.zero_shot else self.id2label
        return label_columns(outputs, id2label, self.options.top_k)


class ZeroShot:
    """Label log-likelihoods under a causal LM. A row becomes one sequence per label (prompt +
    label tokens, right-padded); the prompt and each label are tokenized separately so every
    label continues exactly the same prompt tokens."""

    def __init__(self, context: Any, options: Any) -> None:
        from transformers import AutoModelForCausalLM

        from rayinfer.models import load_model, load_tokenizer
        from rayinfer_tasks._generation import ensure_pad_token

        self.options = options
        self.tokenizer = load_tokenizer(context)
        self.model = load_model(context, AutoModelForCausalLM)
        ensure_pad_token(self.tokenizer, self.model)
        self.label_ids = []
        for label in options.labels:
            ids = self.tokenizer(options.label_prefix + label, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ModelError(f"label {label!r} encodes to no tokens")
            self.label_ids.append(ids)
        self.template = options.prompt.replace("{labels}", ", ".join(options.labels))
        limit = max_input_length(self.tokenizer, self.model, options.max_length)
        overhead = len(self._encode_prompt("")) + max(len(ids) for ids in self.label_ids)
        self.text_limit = limit - overhead
        if self.text_limit < 1:
            raise ModelError(f"the prompt and labels alone take {overhead} tokens, over the limit of {limit}")

    def _encode_prompt(self, text: str) -> list[int]:
        from rayinfer_tasks.generate import chat_prompt

        o = self.options
        prompt = self.template.replace("{text}", text)
        if o.chat:
            return self.tokenizer(chat_prompt(self.tokenizer, prompt, o.system), add_special_tokens=False)["input_ids"]
        return self.tokenizer(prompt, add_special_tokens=True)["input_ids"]

    def preprocess(self, texts: list[str]) -> list[Any]:
        docs = self.tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        items: list[Any] = []
        for text, ids in zip(texts, docs):
            if len(ids) > self.text_limit:
                if not self.options.truncate:
                    items.append(RowError(
                        f"input is {len(ids)} tokens, over the {self.text_limit} left by the prompt and labels",
                        "too_long",
                    ))
                    continue
                text = self.tokenizer.decode(ids[: self.text_limit])
            items.append({"input_ids": self._encode_prompt(text)})
        return items

    def length(self, item: Any) -> int:
        n = len(item["input_ids"])
        return sum(n + len(ids) for ids in self.label_ids)

    def forward(self, items: list[Any]) -> list[Any]:
        import torch

        seqs = [it["input_ids"] + ids for it in items for ids in self.label_ids]
        longest = max(len(s) for s in seqs)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.tensor([s + [pad_id] * (longest - len(s)) for s in seqs], device=self.model.device)
        mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs], device=self.model.device)
        logprobs = self.model(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(dim=-1)
        n_labels = len(self.label_ids)
        out = []
        for r, it in enumerate(items):
            start = len(it["input_ids"])
            lls = []
            for j, ids in enumerate(self.label_ids):
                row = logprobs[r * n_labels + j]
                positions = torch.arange(start - 1, start - 1 + len(ids), device=row.device)
                ll = row[positions, torch.tensor(ids, device=row.device)].sum()
                lls.append(ll / len(ids) if self.options.normalize == "mean" else ll)
            out.append(torch.stack(lls).softmax(dim=0).cpu().numpy())
        return out


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
