"""Text generation shared by the generate and summarize tasks.

Causal LMs are padded on the left with an attention mask, so every row's new tokens start at
the same position; encoder-decoders are padded on the right. Sampling with a seed draws each
row's tokens from that row's own ``torch.Generator`` (seeded from the job seed and the row's
prompt), so a row's text does not depend on which batch it lands in.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import Field

from rayinfer import TaskOptions
from rayinfer.text import collate


class SamplingOptions(TaskOptions):
    max_new_tokens: int = Field(64, ge=1, description="Most tokens generated per row.")
    do_sample: bool = Field(False, description="Sample (true) or decode greedily (false).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with do_sample); 1 turns it off.")
    top_k: int = Field(0, ge=0, description="Sample among the k likeliest tokens (with do_sample); 0 turns it off.")
    repetition_penalty: float = Field(1.0, gt=0, description="Penalty > 1 for tokens already in the row.")
    seed: int | None = Field(
        None, description="Makes sampling reproducible per row, whatever batch the row lands in."
    )
    stop: list[str] = Field(default_factory=list, description="Stop at the first of these strings (not included).")


def row_seed(seed: int, text: str) -> int:
    digest = hashlib.sha256(f"{seed}\x00{text}".encode("utf-8", "replace")).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def make_row_sampler(generators: list[Any]) -> Any:
    from transformers import LogitsProcessor

    class RowSampler(LogitsProcessor):
        """Samples one token per row from that row's generator; greedy selection then takes it."""

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            import torch

            probs = scores.float().softmax(dim=-1)
            choice = torch.stack(
                [torch.multinomial(probs[i].cpu(), 1, generator=g) for i, g in enumerate(generators)]
            ).to(scores.device)
            out = torch.full_like(scores, float("-inf"))
            out.scatter_(1, choice, 0.0)
            return out

    return RowSampler()


def generate(
    model: Any,
    tokenizer: Any,
    items: list[dict[str, Any]],
    options: SamplingOptions,
    seeds_from: list[str] | None = None,
    **extra: Any,
) -> list[tuple[str, int]]:
    """Generate for a micro-batch of encoded rows; return (new text, number of new tokens) per row."""
    import torch
    from transformers import (
        GenerationConfig,
        LogitsProcessorList,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    inputs = collate(items, tokenizer, model.device, side="right" if encoder_decoder else "left")
    inputs.pop("token_type_ids", None)
    eos = tokenizer.eos_token_id
    config = GenerationConfig(
        max_new_tokens=options.max_new_tokens,
        do_sample=False,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=eos,
        bos_token_id=getattr(model.generation_config, "bos_token_id", None),
        decoder_start_token_id=getattr(model.generation_config, "decoder_start_token_id", None),
        **extra,
    )
    processors = LogitsProcessorList()
    if options.repetition_penalty != 1.0 and not options.do_sample:
        config.repetition_penalty = options.repetition_penalty
    if options.do_sample:
        if options.repetition_penalty != 1.0:
            processors.append(RepetitionPenaltyLogitsProcessor(options.repetition_penalty))
        if options.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(options.temperature))
        if options.top_k:
            processors.append(TopKLogitsWarper(options.top_k))
        if options.top_p < 1.0:
            processors.append(TopPLogitsWarper(options.top_p))
        texts = seeds_from or [str(it["input_ids"]) for it in items]
        generators = []
        for text in texts:
            g = torch.Generator()
            if options.seed is not None:
                g.manual_seed(row_seed(options.seed, text))
            else:
                g.seed()
            generators.append(g)
        processors.append(make_row_sampler(generators))
    kwargs: dict[str, Any] = {}
    if options.stop:
        kwargs.update(stop_strings=options.stop, tokenizer=tokenizer)
    out = model.generate(**inputs, generation_config=config, logits_processor=processors, **kwargs)
    new = out if encoder_decoder else out[:, inputs["input_ids"].shape[1] :]
    results = []
    for row in new.tolist():
        if encoder_decoder and row and row[0] == config.decoder_start_token_id:
            row = row[1:]
        n = len(row)
        for j, t in enumerate(row):
            if t == eos or (t == tokenizer.pad_token_id and t != eos and encoder_decoder):
                n = j
                break
        text = tokenizer.decode(row[:n], skip_special_tokens=True)
        for s in options.stop:
            cut = text.find(s)
            if cut >= 0:
                text = text[:cut]
        results.append((text, n))
    return results
