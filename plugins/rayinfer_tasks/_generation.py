"""Text generation shared by the generate and summarize tasks.

Causal LMs go through ``rayinfer.decoding``'s continuous batching (a preallocated KV cache slot
per row; rows that end leave the batch and waiting rows join it), where it supports the model;
otherwise, and for encoder-decoders, beams and n-gram bans, through ``model.generate`` (causal
LMs padded on the left with an attention mask, encoder-decoders on the right). A row's seed comes
from the job seed and its prompt, so its text does not depend on which batch it lands in: the
decode loop draws its tokens on the device from that seed and its token count
(``rayinfer.decoding.Sampler``, every row at once, constrained rows too); ``model.generate`` from
the row's own ``torch.Generator``.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterator

from pydantic import Field

from rayinfer import RowError, TaskOptions
from rayinfer.text import collate, micro_batches, pad_id


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


def row_seeds(options: SamplingOptions, texts: list[str]) -> list[int]:
    """Each row's seed for the decode loop's counter-based draws: from the job's seed and the row's
    text (the same row, the same tokens, whatever its batch), or random without a job seed."""
    import secrets

    if options.seed is None:
        return [secrets.randbits(63) for _ in texts]
    return [row_seed(options.seed, text) for text in texts]


def _sampling_processors(options: SamplingOptions) -> list[Any]:
    """The processors of ``model.generate``'s sampling rows, before each row's own draw (a greedy
    repetition penalty is its ``GenerationConfig``'s)."""
    from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    o, out = options, []
    if o.repetition_penalty != 1.0:
        out.append(RepetitionPenaltyLogitsProcessor(o.repetition_penalty))
    if o.temperature != 1.0:
        out.append(TemperatureLogitsWarper(o.temperature))
    if o.top_k:
        out.append(TopKLogitsWarper(o.top_k))
    if o.top_p < 1.0:
        out.append(TopPLogitsWarper(o.top_p))
    return out


def _generators(options: SamplingOptions, texts: list[str]) -> list[Any]:
    import torch

    generators = []
    for text in texts:
        g = torch.Generator()
        if options.seed is not None:
            g.manual_seed(row_seed(options.seed, text))
        else:
            g.seed()
        generators.append(g)
    return generators


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


def make_constraint_processor(constraints: list[Any], eos: set[int]) -> Any:
    """The same masks for ``model.generate`` (rows that ``rayinfer.decoding`` does not run): each
    call first moves every live row's constraint on by the token the last step chose."""
    from transformers import LogitsProcessor

    class ConstraintProcessor(LogitsProcessor):
        def __init__(self) -> None:
            self.calls = 0
            self.ended = [False] * len(constraints)

        def __call__(self, input_ids: Any, scores: Any) -> Any:
            if self.calls:  # the tokens the last step chose, one read for all rows
                for i, (c, token) in enumerate(zip(constraints, input_ids[:, -1].tolist())):
                    if not self.ended[i]:
                        self.ended[i] = token in eos or not c.accept(token)
            mask_rows([None if ended else c for c, ended in zip(constraints, self.ended)], scores)
            self.calls += 1
            return scores

    return ConstraintProcessor()


def ready_for_decoding(model: Any, gpu_share: float = 1.0) -> int | None:
    """At load: a causal LM that ``rayinfer.decoding`` runs gets its linear layers prepacked
    (CPUs: oneDNN at twice MKL's speed for decode-sized matmuls; elsewhere nothing changes).
    Returns the tokens of KV cache its decode loop may hold on a GPU (the actor's ``gpu_share``
    of the GPU's memory, less its weights: ``rayinfer.models.load.kv_token_budget``), None on CPUs."""
    from rayinfer import decoding
    from rayinfer.models.load import kv_token_budget

    if decoding.supports(model, 1):
        decoding.prepare(model)
    return kv_token_budget(model, gpu_share)


def generate(
    model: Any,
    tokenizer: Any,
    items: list[dict[str, Any]],
    options: SamplingOptions,
    seeds_from: list[str] | None = None,
    limits: tuple[int, int | None] | None = None,
    constraint: Any | None = None,
    kv_budget: int | None = None,
    **extra: Any,
) -> list[Any]:
    """Generate for encoded rows; return (new text, number of new tokens) per row, or a
    ``constraint_unmet`` ``RowError`` for a row whose output does not fit ``constraint`` (a
    ``rayinfer.constraints.Constraint``) when it ends.

    Decoder-only models that ``rayinfer.decoding`` supports, without beams or n-gram bans, go
    through its continuous batching: all ``items`` at once, at most ``limits`` = (tokens of KV
    cache, rows) in flight; on a GPU its KV cache is sized by ``kv_budget`` (what the GPU's memory
    holds, from ``ready_for_decoding``) instead of the token budget of a forward pass. Others
    through ``model.generate``, in passes cut by ``limits``.
    """
    encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
    texts = seeds_from or [str(it["input_ids"]) for it in items]
    tokens, rows = limits or (2**62, None)
    plain = extra.get("num_beams", 1) in (1, None) and not extra.get("no_repeat_ngram_size")
    if plain and not encoder_decoder:
        from rayinfer import decoding

        longest = max(len(it["input_ids"]) for it in items) + options.max_new_tokens
        if decoding.supports(model, longest):
            news = _continuous(decoding, model, tokenizer, items, options, texts,
                               kv_budget if kv_budget is not None else tokens, rows,
                               int(extra.get("min_new_tokens") or 0), constraint)
            return [_result(tokenizer, new, options, constraint) for new in news]
    lengths = {i: len(it["input_ids"]) + options.max_new_tokens for i, it in enumerate(items)}
    order = sorted(lengths, key=lambda i: -lengths[i])
    out: dict[int, list[int]] = {}
    for chunk in micro_batches(order, lengths, tokens, rows or len(items)):
        done = _generate_pass(model, tokenizer, [items[i] for i in chunk], options, [texts[i] for i in chunk],
                              constraint, **extra)
        out.update(zip(chunk, done))
    return [_result(tokenizer, out[i], options, constraint) for i in range(len(items))]


def generate_batch(model: Any, tokenizer: Any, items: list[dict[str, Any]], options: SamplingOptions) -> list[Any]:
    """``options.engine: transformers``: every row through transformers' own continuous batching
    (``model.generate_batch``: paged attention, its own scheduler), as (new text, new tokens) per
    row. Stop strings cut the text afterwards (its count still holds the tokens past them)."""
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    config = GenerationConfig(max_new_tokens=options.max_new_tokens, do_sample=options.do_sample, eos_token_id=eos,
                              pad_token_id=pad_id(tokenizer),
                              **({"temperature": options.temperature, "top_k": options.top_k or None,
                                  "top_p": options.top_p} if options.do_sample else {}))
    prompts = [list(it["input_ids"]) for it in items]
    out = list(model.generate_batch(inputs=prompts, generation_config=config, progress_bar=False,
                                    continuous_batching_config=paged_config(prompts, options.max_new_tokens)).values())
    if len(out) != len(prompts) or any(o.prompt_ids and list(o.prompt_ids) != p for o, p in zip(out, prompts)):
        raise RuntimeError("transformers' generate_batch returned its results out of the prompts' order")
    results = []
    for o in out:
        if o.error:
            results.append(RowError(f"transformers' generate_batch failed on this row: {o.error}", "engine"))
            continue
        row = list(o.generated_tokens)
        n = next((j for j, t in enumerate(row) if t == eos), len(row))
        results.append(_result(tokenizer, row[:n], options, None))
    return results


def paged_config(prompts: list[list[int]], max_new_tokens: int) -> Any:
    """transformers' continuous batching sized for these rows: a page table that holds them all
    at once. Its default sizes the table by the device's memory, and clearing the static tensors
    that size implies cost ~5 s per call on 2 CPU cores (5.8 s -> 0.7 s for 8 short prompts,
    tokens unchanged), a cost each of a job's batches paid."""
    from transformers import ContinuousBatchingConfig

    default = ContinuousBatchingConfig()
    page = getattr(default, "page_size", None) or getattr(default, "block_size", None) or 256  # 5.25 / 5.17
    pages = sum(-(-(len(p) + max_new_tokens) // page) for p in prompts)
    return ContinuousBatchingConfig(num_blocks=pages + 1)


def _result(tokenizer: Any, new: list[int], options: SamplingOptions, constraint: Any | None) -> Any:
    text = _cut(tokenizer.decode(new, skip_special_tokens=True), options.stop)
    if constraint is not None and not constraint.fits(new):
        shown = text if len(text) <= 80 else text[:77] + "..."
        return RowError(f"the output does not fit the {constraint.kind} in {len(new)} tokens "
                        f"(max_new_tokens {options.max_new_tokens}): {shown!r}", "constraint_unmet")
    return text, len(new)


def _continuous(decoding: Any, model: Any, tokenizer: Any, items: list[dict[str, Any]], options: SamplingOptions,
                texts: list[str], tokens: int, rows: int | None, min_new: int, constraint: Any | None
                ) -> list[list[int]]:
    rows_constraints = [constraint.row() for _ in items] if constraint is not None else None
    return decoding.decode(model, [it["input_ids"] for it in items], slots=rows or len(items), budget=tokens,
                           seeds=row_seeds(options, texts), constraints=rows_constraints,
                           **_decode_args(decoding, tokenizer, options, min_new))


def _decode_args(decoding: Any, tokenizer: Any, options: SamplingOptions, min_new: int) -> dict[str, Any]:
    """What ``decoding.decode`` and ``decoding.stream`` take from the options, alike for every row."""
    stopped = None
    if options.stop:
        def stopped(new: list[int]) -> bool:
            text = tokenizer.decode(new, skip_special_tokens=True)
            return any(s in text for s in options.stop)

    eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    sampler = decoding.Sampler(options.do_sample, options.temperature, options.top_k, options.top_p,
                               options.repetition_penalty)
    return dict(max_new_tokens=options.max_new_tokens, eos=eos, pad=pad_id(tokenizer), sampler=sampler,
                mask=mask_rows, min_new_tokens=min_new, stopped=stopped)


def streamable(model: Any, options: SamplingOptions, max_length: int) -> bool:
    """Whether rows of ``model`` up to ``max_length`` prompt tokens can go through ``generate_stream``."""
    from rayinfer import decoding

    return (not getattr(model.config, "is_encoder_decoder", False)
            and decoding.supports(model, max_length + options.max_new_tokens))


def generate_stream(model: Any, tokenizer: Any, batches: Iterator[list[tuple[Any, dict[str, Any]]]],
                    options: SamplingOptions, limits: tuple[int, int | None], constraint: Any | None = None,
                    kv_budget: int | None = None, min_new: int = 0) -> Iterator[tuple[Any, Any]]:
    """``generate`` for a task's ``forward_stream``: batches of (key, item) through one decode
    loop (``rayinfer.decoding.stream``: a batch's rows join as slots free), each row's result (as
    ``generate`` gives it) yielded with its key as the row ends."""
    from rayinfer import decoding

    def rows() -> Iterator[list[Any]]:
        for batch in batches:
            seeds = row_seeds(options, [it["seed_text"] for _, it in batch])
            yield [decoding.Row(key, list(it["input_ids"]), seed=seed,
                                constraint=constraint.row() if constraint is not None else None)
                   for (key, it), seed in zip(batch, seeds)]

    tokens, slots = limits
    for row in decoding.stream(model, rows(), slots=slots, budget=kv_budget if kv_budget is not None else tokens,
                               **_decode_args(decoding, tokenizer, options, min_new)):
        yield row.key, _result(tokenizer, row.new, options, constraint)


def mask_rows(rows: list[Any], scores: Any) -> None:
    """What each row's constraint (``RowConstraint`` or None) forbids, -inf in ``scores`` [rows,
    vocab], in place: the bitmasks filled on the host, copied to the scores' device once."""
    from rayinfer.constraints import apply_bitmask, fill_bitmasks

    apply_bitmask(scores, fill_bitmasks(rows, scores.shape[-1]))


def _cut(text: str, stop: list[str]) -> str:
    for s in stop:
        at = text.find(s)
        if at >= 0:
            text = text[:at]
    return text


def _generate_pass(
    model: Any,
    tokenizer: Any,
    items: list[dict[str, Any]],
    options: SamplingOptions,
    texts: list[str],
    constraint: Any | None = None,
    **extra: Any,
) -> list[list[int]]:
    """One ``model.generate`` call on a micro-batch (encoder-decoders, beams, n-gram bans): each
    row's new tokens, up to (without) end-of-sequence."""
    from transformers import GenerationConfig, LogitsProcessorList

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
        processors.extend(_sampling_processors(options))
    if constraint is not None:  # before the sampler: it draws among the allowed tokens
        processors.insert(0, make_constraint_processor([constraint.row() for _ in items], {eos}))
    if options.do_sample:
        processors.append(make_row_sampler(_generators(options, texts)))
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
        results.append(row[:n])
    return results
