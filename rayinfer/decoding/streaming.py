"""Decoding a job's batches as one stream: rows join the decode loop as slots free, whatever batch
they came in, and leave as they end (``stream``). The loop itself is ``rayinfer.decoding.loop``."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator

import torch

from rayinfer.decoding.loop import _Loop
from rayinfer.decoding.rows import DecodeStats, Row, next_rows
from rayinfer.decoding.sampling import Sampler

HEADROOM = 2
"""``stream`` sizes a loop's slots for prompts up to this many times the first list's longest; a later,
longer row grows them (as far as the budget allows at the same slots: past that it starts another loop)."""


def stream(
    model: Any,
    lists: Iterable[list[Row]],
    *,
    max_new_tokens: int,
    eos: set[int],
    pad: int,
    slots: int | None = None,
    budget: int | None = None,
    sampler: Sampler | None = None,
    mask: Callable[[list[Any], torch.Tensor], None] | None = None,
    min_new_tokens: int = 0,
    stopped: Callable[[list[int]], bool] | None = None,
    stats: DecodeStats | None = None,
) -> Iterator[Row]:
    """``decode`` for rows that come in lists (a job's batches, one after the other): each row is
    handed back as it ends, and the next list is taken as soon as slots are free and no row of the
    last one waits, so its rows join the batch where it is (no drain between lists). At most
    ``slots`` rows in flight (None: the first list's rows), fewer where ``budget`` says so. A row
    longer than the slots' columns grows them, within ``budget``; a row the loop cannot hold (longer
    still, or without the prefix it shares) waits for the loop to drain and starts another with the
    rows after it (``stats.loops`` counts the loops)."""
    stats = stats if stats is not None else DecodeStats()
    source = iter(lists)
    first = next_rows(source, stats)
    while first:
        longest = max(len(r.prompt) for r in first)
        needed, roomy = longest + max_new_tokens, longest * HEADROOM + max_new_tokens
        cap = max(1, slots if slots is not None else len(first))
        n_slots = max(1, min(cap, (budget // needed) if budget else cap))
        room = budget // n_slots if budget else 1 << 40  # the columns a slot may grow to
        loop = _Loop(model, n_slots, max(needed, min(room, roomy)), eos, pad, max_new_tokens, min_new_tokens,
                     stopped, stats, sampler, mask, room)
        loop.share_prefix(first)
        first = yield from loop.run(first, source)
