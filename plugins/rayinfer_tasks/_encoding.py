"""Helpers shared by the transformer tasks: encoding rows once, padding micro-batches."""

from __future__ import annotations

from typing import Any

from rayinfer.errors import RowError

_HUGE = 10**8  # tokenizers without a real limit report int(1e30)


def max_input_length(tokenizer: Any, model: Any, requested: int | None = None) -> int:
    """The longest input the model takes: the option, else the tokenizer's limit, else the config's."""
    limits = []
    tok_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(tok_max, int) and 0 < tok_max < _HUGE:
        limits.append(tok_max)
    cfg_max = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if isinstance(cfg_max, int) and cfg_max > 0:
        limits.append(cfg_max)
    limit = min(limits) if limits else 512
    return min(requested, limit) if requested else limit


def encode(
    tokenizer: Any, texts: list[str], max_length: int, truncate: bool, pairs: list[str] | None = None, **kwargs: Any
) -> list[Any]:
    """Tokenize each row once (no padding); ``pairs`` gives a second segment per row (NSP).

    A row over ``max_length`` is truncated, or, with ``truncate`` off, becomes a RowError. A
    single text keeps its closing special tokens; a pair is cut longest-first, as BERT was
    trained. Each item gets ``truncated``: whether tokens were cut."""
    if pairs is None:
        enc = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False, **kwargs)
    else:
        enc = tokenizer(texts, pairs, add_special_tokens=True, truncation=False, verbose=False, **kwargs)
    keys = [k for k in enc.keys() if k in ("input_ids", "token_type_ids", "attention_mask")]
    items: list[Any] = []
    for i in range(len(texts)):
        item = {k: enc[k][i] for k in keys}
        n = len(item["input_ids"])
        item["truncated"] = n > max_length
        if n > max_length:
            if not truncate:
                items.append(RowError(f"input is {n} tokens, over the model's limit of {max_length}", "too_long"))
                continue
            if pairs is None:
                item = _truncate(tokenizer, item, max_length)
            else:
                cut = tokenizer(
                    texts[i], pairs[i], truncation="longest_first", max_length=max_length, verbose=False, **kwargs
                )
                item = {k: cut[k] for k in keys} | {"truncated": True}
        items.append(item)
    return items


def _truncate(tokenizer: Any, item: dict[str, Any], max_length: int) -> dict[str, Any]:
    """Cut the content, keep the closing special tokens (e.g. [SEP], </s>)."""
    ids = item["input_ids"]
    special = {t for t in (tokenizer.sep_token_id, tokenizer.eos_token_id) if t is not None}
    tail = 0
    while tail < len(ids) and ids[len(ids) - 1 - tail] in special:
        tail += 1
    keep_head = max_length - tail
    out = {}
    for k, v in item.items():
        if isinstance(v, list):
            out[k] = v[:keep_head] + (v[len(v) - tail :] if tail else [])
        else:
            out[k] = v
    return out


def pad(tokenizer: Any, items: list[dict[str, Any]], device: Any, side: str = "right") -> dict[str, Any]:
    """Pad a micro-batch to its longest row and move it to ``device``."""
    import torch

    keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in items[0]]
    longest = max(len(it["input_ids"]) for it in items)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = {}
    for k in keys + (["attention_mask"] if "attention_mask" not in keys else []):
        fill = pad_id if k == "input_ids" else 0
        rows = []
        for it in items:
            v = it[k] if k in it else [1] * len(it["input_ids"])
            gap = [fill] * (longest - len(v))
            rows.append(gap + list(v) if side == "left" else list(v) + gap)
        out[k] = torch.tensor(rows, dtype=torch.long, device=device)
    return out


def require_text_slot(value: str) -> str:
    """Validator of prompt templates: they must say where the row's text goes."""
    if "{text}" not in value:
        raise ValueError("must contain {text}, where the input goes")
    return value
