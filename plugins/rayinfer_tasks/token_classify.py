"""token-classify: the entities in each text (named entities, part-of-speech tags, PII spans) from a
token-classification head (``*ForTokenClassification``).

The output is transformers' token-classification pipeline's, row for row: with ``aggregation``
``simple``, ``first``, ``average`` or ``max`` a list of ``{entity_group, score, word, start,
end}`` (sub-words fused into words, then B-/I- tags into entities); with ``none`` one entry per
token (``entity``, ``index``). ``start``/``end`` are character offsets into the row's text. A text
longer than the model's window is read in overlapping windows with ``stride`` (as the
pipeline's ``stride``: entities found twice in the overlap are merged, offsets stay in the whole
text); without it, the text is cut at the window and the row says ``truncated``.

rayinfer tokenizes on its prep thread, batches every window of a batch's rows by tokens, and
hands each row's windows to the pipeline's own post-processing, so the entities are the
pipeline's for the same logits.
"""

from __future__ import annotations

from typing import Any, Literal

import pyarrow as pa
from pydantic import Field, model_validator

from rayinfer import Batch, InputColumn, ModelRequirement, Task, TaskOptions, hookimpl
from rayinfer.errors import ModelError
from rayinfer.text import ENCODED_KEYS, collate

GROUPED = pa.struct([("entity_group", pa.string()), ("score", pa.float64()), ("word", pa.string()),
                     ("start", pa.int64()), ("end", pa.int64())])
TOKENS = pa.struct([("entity", pa.string()), ("score", pa.float64()), ("index", pa.int64()), ("word", pa.string()),
                    ("start", pa.int64()), ("end", pa.int64())])


class TokenClassifyTask(Task):
    name = "token-classify"
    description = ("Entities in texts (NER, PII, POS) from a token-classification head: the token-classification "
                   "pipeline's entity groups, words and character offsets; long texts in strided windows.")
    inputs = {"text": InputColumn("The text to tag.")}
    requires = ModelRequirement(
        "AutoModelForTokenClassification",
        architectures=("ForTokenClassification",),
        what="a token-classification head (*ForTokenClassification)",
        hint="Its head would be random: use a checkpoint trained for NER / token tagging.",
        encoder_decoder=False,
        adapter_task_types=frozenset({"TOKEN_CLS"}),
    )

    class Options(TaskOptions):
        aggregation: Literal["none", "simple", "first", "average", "max"] = Field(
            "simple", description="How tokens become entities, as the pipeline's aggregation_strategy: none (one "
            "entry per token), simple (B-/I- tags grouped), first / average / max (sub-words fused into words by "
            "the first sub-word's label, the average or the best scores).")
        ignore_labels: list[str] = Field(["O"], description="Labels left out of the output (with an aggregation: "
                                         "entity group names, the tag without B-/I-, e.g. PER).")
        stride: int | None = Field(
            None, ge=0, description="Read texts longer than max_length in windows that overlap by this many tokens "
            "(as the pipeline's stride; not with aggregation none); default: cut them at max_length.")
        max_length: int | None = Field(None, ge=2, description="Tokens per window; default: the model's limit.")

        @model_validator(mode="after")
        def _stride_needs_words(self) -> TokenClassifyTask.Options:
            if self.stride is not None and self.aggregation == "none":
                raise ValueError("stride merges the entities found in overlapping windows: choose an aggregation "
                                 "other than none (simple, first, average or max)")
            return self

    @classmethod
    def output_schema(cls, options: TaskOptions) -> pa.Schema:
        assert isinstance(options, TokenClassifyTask.Options)
        entry = TOKENS if options.aggregation == "none" else GROUPED
        return pa.schema([pa.field("entities", pa.list_(entry)), pa.field("truncated", pa.bool_())])

    def load(self) -> None:
        super().load()
        from transformers import TokenClassificationPipeline
        from transformers.pipelines.token_classification import AggregationStrategy

        o = self.options
        if not self.tokenizer.is_fast:
            raise ModelError(f"token-classify needs character offsets, which {self.context.model!r}'s slow "
                             "tokenizer does not give: use a model with a tokenizer.json (a fast tokenizer)")
        if o.stride is not None and o.stride >= self.max_length - self.tokenizer.num_special_tokens_to_add():
            raise ModelError(f"stride {o.stride} leaves no new tokens in a window of {self.max_length} "
                             f"(its special tokens included): choose a smaller stride")
        # the pipeline object only post-processes (its model is never called): the same entities
        self.pipe = TokenClassificationPipeline(model=self.model, tokenizer=self.tokenizer)
        self.strategy = AggregationStrategy[o.aggregation.upper()]

    def preprocess(self, batch: Batch) -> list[Any]:
        texts = batch["text"]
        windows = {"return_overflowing_tokens": True, "stride": self.options.stride} if self.options.stride is not None else {}
        enc = self.tokenizer(texts, truncation=True, max_length=self.max_length, return_special_tokens_mask=True,
                             return_offsets_mapping=True, verbose=False, **windows)
        keys = [k for k in (*ENCODED_KEYS, "offset_mapping", "special_tokens_mask") if k in enc]
        rows = enc["overflow_to_sample_mapping"] if windows else list(range(len(texts)))
        items: list[Any] = [{"text": t, "windows": [], "truncated": False} for t in texts]
        for w, row in enumerate(rows):
            items[row]["windows"].append({k: enc[k][w] for k in keys})
        if not windows:  # was anything cut? (with stride nothing is: every token is in a window)
            for item in items:
                window = item["windows"][0]
                ends = [end for (_, end), special in zip(window["offset_mapping"], window["special_tokens_mask"])
                        if not special]
                item["truncated"] = bool(ends) and bool(item["text"][max(ends):].strip())
        return items

    def length(self, item: Any) -> int:
        return sum(len(w["input_ids"]) for w in item["windows"])

    def forward(self, items: list[Any]) -> list[Any]:
        windows = [w for item in items for w in item["windows"]]
        inputs = collate(windows, self.tokenizer, self.model.device)  # collate takes only the model's keys
        logits = self.model(**inputs).logits.float().cpu()
        out, w = [], 0
        for item in items:
            mine = []
            for window in item["windows"]:
                mine.append((logits[w, : len(window["input_ids"])], window))
                w += 1
            out.append((mine, item["text"], item["truncated"]))
        return out

    def postprocess(self, outputs: list[Any], batch: Batch) -> dict[str, list[Any]]:
        import torch

        entities, truncated = [], []
        for windows, text, cut in outputs:
            found = self.pipe.postprocess(
                [{"logits": scores[None], "input_ids": torch.tensor([w["input_ids"]]),
                  "offset_mapping": torch.tensor([w["offset_mapping"]]),
                  "special_tokens_mask": torch.tensor([w["special_tokens_mask"]]), "sentence": text}
                 for scores, w in windows],
                aggregation_strategy=self.strategy, ignore_labels=self.options.ignore_labels)
            entities.append([{**e, "score": float(e["score"]), "start": int(e["start"]), "end": int(e["end"]),
                              **({"index": int(e["index"])} if "index" in e else {})} for e in found])
            truncated.append(cut)
        return {"entities": entities, "truncated": truncated}


@hookimpl
def register_tasks(register: Any) -> None:
    register(TokenClassifyTask)
