"""What the decode loop takes and gives: its rows (``Row``), and what it computed (``DecodeStats``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

Picker = Callable[[list[int], torch.Tensor], int]
"""Chooses a row's next token: (the row's tokens so far, prompt and new; its scores [1, vocab]) -> id."""


@dataclass
class DecodeStats:
    """What a ``decode`` or ``stream`` call computed: passes and the rows in them."""

    prefills: int = 0  # passes that brought rows in
    prefill_tokens: int = 0  # prompt tokens they computed, padding and the shared prefix included
    prefix_tokens: int = 0  # the prompts' common first tokens, computed once per loop (summed)
    steps: int = 0  # decode steps
    row_steps: int = 0  # rows in flight, summed over the steps: the tokens decoded
    slot_steps: int = 0  # slots computed, summed over the steps (>= row_steps: free slots)
    step_reads: int = 0  # device-to-host reads in decode steps: one per step where no row has a picker
    prefill_reads: int = 0  # ... and in prefill passes (one per pass)
    loops: int = 0  # KV caches started: ``stream`` starts another only for rows the last one cannot hold
    lists: int = 0  # lists of rows taken from ``stream``'s source


@dataclass(eq=False)
class Row:
    """One prompt to decode: ``key`` is the caller's (``stream`` hands the row back when it ends);
    ``new`` fills with its tokens, up to (without) the first end-of-sequence."""

    key: Any
    prompt: list[int]
    pick: Picker | None = None  # chooses its tokens on the host (None: on the device, with every row)
    seed: int = 0  # its draws when sampling: the same tokens whatever its batch
    constraint: Any = None  # a rayinfer.constraints.RowConstraint
    new: list[int] = field(default_factory=list)


def next_rows(source: Iterator[list[Row]], stats: DecodeStats) -> list[Row]:
    """The next non-empty list of rows from ``source`` ([] at its end)."""
    for rows in source:
        stats.lists += 1
        if rows:
            return rows
    return []
