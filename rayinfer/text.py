"""The task author's toolkit: encoding rows, collating micro-batches, scoring with causal LMs.

Every built-in task uses these, exactly as a plugin does. They take a Hugging Face tokenizer and
model and plain Python lists; torch is imported inside the functions that need it, so importing
this module from a task module costs nothing.

- ``max_input_length(tokenizer, model, requested)``: the longest input the model takes;
- ``encode(tokenizer, texts, max_length, truncate, pairs=None)``: one item per row, cut to the
  limit (closing special tokens kept) with a ``truncated`` flag, or a ``RowError``;
- ``cut_text(tokenizer, texts, limit)``: a document cut to ``limit`` tokens, before it goes into
  a prompt;
- ``encode_prompts(tokenizer, prompts, chat, system)``: prompt token ids, through the chat
  template when asked;
- ``ensure_pad_token(tokenizer, model)``: eos as the pad token for tokenizers without one;
- ``collate(items, tokenizer, device, side)``: padded tensors and attention masks on the device;
- ``micro_batches(order, lengths, max_tokens, max_rows)``: rows cut into passes under a token
  budget (the runner's rule; a task that schedules its own rows uses it where it falls back);
- ``continuation_logprobs(model, prefixes, continuations)``: per row, the summed float32
  log-likelihood of a continuation given its prefix, padding excluded, computing vocabulary
  logits only at the scored positions; ``sliding_windows(ids, max_length, stride)`` cuts a long
  text into the (context, scored) windows it takes.
"""

from __future__ import annotations

import inspect
from typing import Any, Sequence

from rayinfer.errors import ModelError, RowError

_HUGE = 10**8  # tokenizers without a real limit report int(1e30)
ENCODED_KEYS = ("input_ids", "token_type_ids", "attention_mask")


def max_input_length(tokenizer: Any, model: Any, requested: int | None = None) -> int:
    """The longest input the model takes: ``requested`` if smaller, else the tokenizer's or the
    config's limit (``max_position_embeddings``), else 512."""
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
    """Tokenize each row once, unpadded; ``pairs`` gives a second segment per row (BERT pairs).

    A row over ``max_length`` is cut, or, with ``truncate`` off, becomes a ``RowError`` of kind
    ``too_long``. A single text keeps its closing special tokens ([SEP], </s>); a pair is cut
    longest-first, as BERT was trained. Every item carries ``truncated``."""
    if pairs is None:
        enc = tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False, **kwargs)
    else:
        enc = tokenizer(texts, pairs, add_special_tokens=True, truncation=False, verbose=False, **kwargs)
    keys = [k for k in enc.keys() if k in ENCODED_KEYS]
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
                item = _keep_closing_specials(tokenizer, item, max_length)
            else:
                cut = tokenizer(
                    texts[i], pairs[i], truncation="longest_first", max_length=max_length, verbose=False, **kwargs
                )
                item = {k: cut[k] for k in keys} | {"truncated": True}
        items.append(item)
    return items


def _keep_closing_specials(tokenizer: Any, item: dict[str, Any], max_length: int) -> dict[str, Any]:
    ids = item["input_ids"]
    special = {t for t in (tokenizer.sep_token_id, tokenizer.eos_token_id) if t is not None}
    tail = 0
    while tail < len(ids) and ids[len(ids) - 1 - tail] in special:
        tail += 1
    keep_head = max_length - tail
    return {
        k: v[:keep_head] + (v[len(v) - tail :] if tail else []) if isinstance(v, list) else v
        for k, v in item.items()
    }


def cut_text(tokenizer: Any, texts: list[str], limit: int) -> list[tuple[str, int]]:
    """(the text cut to at most ``limit`` tokens, its full length in tokens) per row: for a
    document that goes into a prompt, where the prompt's own tokens must not be cut."""
    ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return [(tokenizer.decode(row[:limit]) if len(row) > limit else text, len(row)) for text, row in zip(texts, ids)]


def chat_prompt(tokenizer: Any, user: str, system: str | None = None) -> str:
    """``user`` (and ``system``) through the tokenizer's chat template, ready for the reply."""
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("chat: true, but the tokenizer has no chat template; set chat: false and write the prompt")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def encode_prompts(tokenizer: Any, prompts: list[str], chat: bool = False, system: str | None = None) -> list[list[int]]:
    """Token ids of each prompt: through the chat template (which writes its own special tokens),
    or as plain text with the tokenizer's special tokens (a BOS where the model has one)."""
    if chat:
        prompts = [chat_prompt(tokenizer, p, system) for p in prompts]
    return tokenizer(prompts, add_special_tokens=not chat, verbose=False)["input_ids"]


def require_text_slot(value: str) -> str:
    """A pydantic validator for prompt templates: they must say where the row's text goes."""
    if "{text}" not in value:
        raise ValueError("must contain {text}, where the input goes")
    return value


def ensure_pad_token(tokenizer: Any, model: Any = None) -> None:
    """Causal LMs often have no pad token: pad with eos (the attention mask hides it), and tell
    the model's configs, which sequence-classification heads and ``generate`` read."""
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if model is None:
        return
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    generation = getattr(model, "generation_config", None)
    if generation is not None and getattr(generation, "pad_token_id", None) is None:
        generation.pad_token_id = tokenizer.pad_token_id


def pad_id(tokenizer: Any) -> int:
    """The id to pad with: the pad token, else eos, else 0 (the attention mask hides it)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def collate(items: Sequence[dict[str, Any]], tokenizer: Any, device: Any, side: str = "right") -> dict[str, Any]:
    """Pad a micro-batch of encoded rows (``input_ids``, optional ``token_type_ids`` and
    ``attention_mask``) to its longest row; add the attention mask; move the tensors to
    ``device``. ``side="left"`` for causal LMs that generate, so every row ends at the same place.
    Other keys of the items (``truncated``, ...) are left out."""
    import torch

    keys = [k for k in ENCODED_KEYS if k in items[0]]
    if "attention_mask" not in keys:
        keys.append("attention_mask")
    longest = max(len(it["input_ids"]) for it in items)
    fill_ids = pad_id(tokenizer)
    out = {}
    for key in keys:
        fill = fill_ids if key == "input_ids" else 0
        rows = []
        for it in items:
            value = list(it[key]) if key in it else [1] * len(it["input_ids"])
            gap = [fill] * (longest - len(value))
            rows.append(gap + value if side == "left" else value + gap)
        out[key] = torch.tensor(rows, dtype=torch.long, device=device)
    return out


PAD_SLACK = 0.2
"""Once a chunk holds half the budget, a row this much shorter than its longest starts a new one."""


def micro_batches(order: list[int], lengths: dict[int, int], max_tokens: int,
                  max_rows: int | None = None) -> list[list[int]]:
    """Cut rows (already sorted longest first) into chunks with len(chunk) * longest <= max_tokens.

    Encoders (``max_rows`` None): a chunk that already holds half the budget also ends where the
    rows get more than ``PAD_SLACK`` shorter than its longest row: without that, a budget's worth
    of short rows spans a wide range of lengths and pads a fifth of its work (1.22x -> 1.14x padded
    tokens on the benchmark's sentences), while passes of half the budget still run at full speed.
    Decoders (``max_rows`` set): chunks of up to ``max_rows`` rows within the budget, no cut for
    padding: each chunk is a whole decode loop, so fewer, fuller chunks win. A single row longer
    than the budget still gets a chunk of its own.
    """
    chunks: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        n = max(1, lengths[i])
        over = (len(current) + 1) * max(longest, n) > max_tokens or len(current) == (max_rows or len(current) + 1)
        spread = max_rows is None and 2 * len(current) * longest >= max_tokens and n < longest * (1 - PAD_SLACK)
        if current and (over or spread):
            chunks.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        chunks.append(current)
    return chunks


def continuation_logprobs(
    model: Any, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]], pad: int = 0
) -> list[float]:
    """Per row, the log-likelihood a causal LM gives ``continuations[i]`` right after
    ``prefixes[i]`` (token ids; the prefix is not scored and needs at least one token, e.g. BOS):
    one batched, right-padded forward pass with an attention mask, so padding changes nothing.

    Vocabulary logits are computed only over the span of scored positions (``logits_to_keep``,
    where the model takes it) and turned into log-probabilities in float32 one row at a time, so
    memory stays near the model's own activations, not batch x length x vocabulary in float32.
    Divide by ``len(continuations[i])`` for the mean per token."""
    import torch

    if not prefixes:
        return []
    for prefix, cont in zip(prefixes, continuations):
        if not prefix or not cont:
            raise ValueError("continuation_logprobs needs a prefix of at least one token and a continuation")
    seqs = [list(p) + list(c) for p, c in zip(prefixes, continuations)]
    longest = max(len(s) for s in seqs)
    device = model.device
    input_ids = torch.tensor([s + [pad] * (longest - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (longest - len(s)) for s in seqs], device=device)
    # position t's logits predict token t+1: row i needs positions len(prefix)-1 .. len(seq)-2
    first = min(len(p) for p in prefixes) - 1
    last = max(len(s) for s in seqs) - 1
    kwargs: dict[str, Any] = {}
    if _takes_logits_to_keep(model):
        kwargs["logits_to_keep"] = torch.arange(first, last, device=device)
        offset = first
    else:
        offset = 0
    logits = model(input_ids=input_ids, attention_mask=mask, **kwargs).logits
    sums = []
    for i, (prefix, cont) in enumerate(zip(prefixes, continuations)):
        start = len(prefix) - 1 - offset
        rows = logits[i, start : start + len(cont)].float().log_softmax(dim=-1)
        targets = torch.tensor(list(cont), device=rows.device).unsqueeze(1)
        sums.append(rows.gather(1, targets).double().sum())
    return torch.stack(sums).tolist()  # one device-to-host copy for the batch, not one per row


def sliding_windows(ids: list[int], max_length: int, stride: int | None = None) -> list[tuple[list[int], list[int]]]:
    """Cut a causal LM's input into (context, scored tokens) windows of at most ``max_length``
    tokens, for ``continuation_logprobs``: each window scores the ``stride`` tokens after the last
    window's, given up to ``max_length - stride`` tokens before them (transformers' perplexity
    guide); together they score ``ids[1:]`` once each (the first token has no context). Without
    ``stride``, one window (``ids`` must then fit in ``max_length``)."""
    out, done = [], 1
    for begin in range(0, len(ids) - 1, stride or max_length):
        end = min(begin + max_length, len(ids))
        out.append((ids[begin:done], ids[done:end]))
        done = end
        if end == len(ids):
            break
    return out


def _takes_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


__all__ = [
    "chat_prompt",
    "collate",
    "continuation_logprobs",
    "cut_text",
    "encode",
    "encode_prompts",
    "ensure_pad_token",
    "max_input_length",
    "micro_batches",
    "pad_id",
    "require_text_slot",
    "sliding_windows",
]
