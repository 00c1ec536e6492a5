"""A decode loop that keeps its batch full: continuous batching of causal LMs, row by row.

``decode(model, prompts, ...)`` generates for any number of prompts with at most ``slots`` rows
in flight. Each row owns a slot of a preallocated KV cache (its prompt's keys and values from
column 0, one column more per step), so nothing is copied as the cache grows (the default
cache concatenates every layer's keys and values at every step: a third of a decode step on
CPUs). A row that ends (end-of-sequence, ``max_new_tokens``, a stop string) frees its slot at
once; the next waiting rows are prefilled together (in passes of similar lengths, so little
padding is computed) and join the batch where it is, each at its own position. Nothing is
decoded for rows that already ended. The prompts' common first tokens (a chat template's system
prompt, an instruction, few-shot examples) are computed once per loop; each prefill computes
only a row's own tokens after them. ``rayinfer.decoding.streaming`` feeds one loop list after list.

Each row's keys and values are exactly those ``model.generate`` computes for it (its own
positions, no padding inside its slot), and each step attends over the row's own columns only,
so greedy decoding gives ``generate``'s tokens (fp32; batch shapes can change the last bits of
a matmul, never seen to change a token in the tests). Every row's token is chosen on the device,
all rows at once: the best one or the ``Sampler``'s (penalties, temperature, top-k/p, each row's
draw from its own seed and token count, so whatever the batch), among what its constraint allows.
A row given its own ``pick`` function chooses on the host instead.

Decode steps of a Llama-family model run through ``rayinfer.decoding.fast.LlamaStep`` (the same
computation as its ``forward``, lean); other models through their ``forward``. ``supports(model)``
says which models take this path (``rayinfer.decoding.cache``); others go through ``model.generate``.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Iterator, Sequence

import torch
from transformers.cache_utils import Cache, DynamicCache

from rayinfer.decoding.cache import Slots, allocate, cache_arg, grow, supports
from rayinfer.decoding.fast import LlamaStep
from rayinfer.decoding.rows import DecodeStats, Picker, Row, next_rows
from rayinfer.decoding.sampling import Sampler

JOIN_FRACTION = 8
"""Waiting rows join once a slot in this many is free (or the batch has run dry): each prefill is
a pass of its own, so joining one row at a time costs a pass per row."""

def decode(
    model: Any,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos: set[int],
    pad: int,
    slots: int,
    budget: int | None = None,
    pickers: Sequence[Picker | None] | None = None,
    sampler: Sampler | None = None,
    seeds: Sequence[int] | None = None,
    constraints: Sequence[Any] | None = None,
    mask: Callable[[list[Any], torch.Tensor], None] | None = None,
    min_new_tokens: int = 0,
    stopped: Callable[[list[int]], bool] | None = None,
    stats: DecodeStats | None = None,
) -> list[list[int]]:
    """New tokens per prompt (up to, without, the first ``eos``). At most ``slots`` rows in flight,
    fewer where ``budget`` (tokens of KV cache: slots x (longest prompt + max_new_tokens)) says so.
    ``sampler`` chooses every row's tokens on the device (None: the best), row i drawing from
    ``seeds[i]`` among the tokens ``constraints[i]`` allows: ``mask(constraints, scores)`` sets what
    each forbids to -inf, all rows at once; a row whose ``accept(token)`` is false ends, unmet.
    ``pickers[i]`` chooses row i's on the host instead; ``stopped(new)`` ends a row early."""
    if constraints and mask is None:
        raise ValueError("decode: constraints need mask, the function that applies them to the scores")
    rows = [Row(i, list(p), pickers[i] if pickers else None, seeds[i] if seeds else 0,
                constraints[i] if constraints else None) for i, p in enumerate(prompts)]
    if not rows:
        return []
    length = max(len(r.prompt) for r in rows) + max_new_tokens
    n_slots = max(1, min(slots, len(rows), (budget // length) if budget else len(rows)))
    stats = stats if stats is not None else DecodeStats()
    loop = _Loop(model, n_slots, length, eos, pad, max_new_tokens, min_new_tokens, stopped, stats, sampler, mask)
    loop.share_prefix(rows)
    for _ in loop.run(rows, iter(())):
        pass
    return [r.new for r in rows]


LEAN_STEPS = True
"""Decode steps of Llama-family models through ``LlamaStep`` (False: through the model's forward)."""

MIN_PREFIX = 8
"""Prompts that share at least this many first tokens compute them once (``share_prefix``)."""

PREFILL_SLACK = 0.2
"""A prefill pass ends where its rows get this much shorter than its longest: prompts are padded to
the longest of their pass (48 chat prompts of 18-187 tokens in one pass: 6,651 tokens computed for
3,242, more than a third of the job's time on 2 CPU cores)."""


def _prefill_groups(rows: list[Row]) -> list[list[Row]]:
    """Rows (longest first) cut into prefill passes of similar lengths."""
    groups: list[list[Row]] = []
    for r in rows:
        if groups and len(r.prompt) >= len(groups[-1][0].prompt) * (1 - PREFILL_SLACK):
            groups[-1].append(r)
        else:
            groups.append([r])
    return groups


class _Loop:
    def __init__(self, model: Any, n_slots: int, length: int, eos: set[int], pad: int, max_new: int,
                 min_new: int, stopped: Callable[[list[int]], bool] | None, stats: DecodeStats,
                 sampler: Sampler | None = None, mask: Callable[[list[Any], torch.Tensor], None] | None = None,
                 room: int = 0) -> None:
        self.stats = stats
        self.model, self.eos, self.pad, self.max_new, self.min_new, self.stopped = model, eos, pad, max_new, min_new, stopped
        self.device = model.device
        self.cache_arg = cache_arg(model)
        self.eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=self.device)
        self.n_slots, self.length, self.room = n_slots, length, room  # room: the most columns a slot may grow to
        self.shared = Slots(torch.zeros(n_slots, dtype=torch.long, device=self.device),
                             torch.arange(n_slots, device=self.device))
        # the host keeps its own copy of what it needs each step (the slots' lengths), and the
        # device a 0/1 per slot for the rows in flight: a step then reads the device once, for
        # the next tokens, and writes it nothing but where rows join or end
        self.lens = [0] * n_slots
        self.live = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        # a sampler's state per slot, on the device: the row's seed, its tokens so far, and (for a
        # repetition penalty) which tokens it holds; allocated by the first join (the vocabulary)
        self.sampler = sampler if sampler is not None and sampler.needed else None  # None: the best token
        self.mask = mask
        self.seeds = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        self.counts = torch.zeros(n_slots, dtype=torch.long, device=self.device)
        self.seen: torch.Tensor | None = None
        self.cache: Cache | None = None  # allocated by the first prefill, when the shapes are known
        self.prefix: list[tuple[torch.Tensor, torch.Tensor]] = []  # the shared prefix's keys and values per layer
        self.prefix_ids: list[int] = []
        self.slot_row: list[Row | None] = [None] * n_slots
        self.done: list[Row] = []  # rows that ended, for ``run`` to hand back
        self.next_token = torch.full((n_slots, 1), pad, dtype=torch.long, device=self.device)
        eager = getattr(model.config, "_attn_implementation", "sdpa") == "eager"
        self.mask_fill = torch.finfo(model.dtype).min if eager else None
        self.lean = LlamaStep(model) if LEAN_STEPS and LlamaStep.fits(model) else None

    def run(self, rows: list[Row], source: Iterator[list[Row]]) -> Generator[Row, None, list[Row]]:
        """Decode ``rows``, then the lists ``source`` gives while they fit, handing each row back as
        it ends; return the first rows that do not fit (for another loop), [] when ``source`` ends."""
        self.stats.loops += 1
        waiting = list(reversed(rows))  # pop() takes the next row in order
        later: list[Row] = []
        more = True
        while True:
            free = [s for s, r in enumerate(self.slot_row) if r is None]
            busy = self.n_slots - len(free)
            if not waiting and free and more and not later:  # room: the next list joins
                rows = next_rows(source, self.stats)
                more = bool(rows)
                fit = [self.admit(r) for r in rows]
                waiting = [r for r, ok in zip(reversed(rows), reversed(fit)) if ok]
                later = [r for r, ok in zip(rows, fit) if not ok]
                continue
            if waiting and free and (busy == 0 or len(free) * JOIN_FRACTION >= self.n_slots or len(waiting) <= len(free)):
                group = sorted((waiting.pop() for _ in range(min(len(free), len(waiting)))), key=lambda r: -len(r.prompt))
                for part in _prefill_groups(group):
                    self._join(part, free[: len(part)])
                    free = free[len(part):]
                yield from self._ended()
                continue
            if busy == 0:
                return later
            if not waiting and (later or not more) and busy * 2 <= self.n_slots and self.n_slots > 1:
                self._shrink()
            self._step()
            yield from self._ended()

    def admit(self, row: Row) -> bool:
        """Whether ``row`` can join this loop: it starts with the shared prefix, and its tokens fit a
        slot; where they fall short the slots' columns grow now (to twice as many, at most ``room``)."""
        p0, need = len(self.prefix_ids), len(row.prompt) + self.max_new
        if len(row.prompt) <= p0 or row.prompt[:p0] != self.prefix_ids or need > max(self.length, self.room):
            return False
        if need > self.length:
            self.length = min(self.room, max(need, 2 * self.length))
            if self.cache is not None:
                grow(self.cache, self.length)
        return True

    def _ended(self) -> Iterator[Row]:
        done, self.done = self.done, []
        yield from done

    # -- prefill: rows join -----------------------------------------------------------------

    def share_prefix(self, rows: list[Row]) -> None:
        """Compute the prompts' common first tokens (a system prompt, few-shot examples) once:
        every prefill then starts from them and computes only each row's own tokens."""
        if len(rows) < 2:
            return
        shared = rows[0].prompt
        for r in rows[1:]:
            n = next((k for k, (a, b) in enumerate(zip(shared, r.prompt)) if a != b), min(len(shared), len(r.prompt)))
            shared = shared[:n]
        shared = shared[: min(len(r.prompt) for r in rows) - 1]  # every row keeps a token of its own
        if len(shared) < MIN_PREFIX:
            return
        cache = DynamicCache(config=self.model.config)
        ids = torch.tensor([shared], dtype=torch.long, device=self.device)
        self.model(input_ids=ids, position_ids=torch.arange(len(shared), device=self.device)[None, :],
                   use_cache=True, logits_to_keep=1, **{self.cache_arg: cache})
        self.prefix = [(layer.keys, layer.values) for layer in cache.layers]
        self.prefix_ids = shared
        self.stats.prefix_tokens += len(shared)
        self.stats.prefill_tokens += len(shared)

    def _join(self, group: list[Row], free: list[int]) -> None:
        p0 = len(self.prefix_ids)
        own = [r.prompt[p0:] for r in group]
        longest = max(len(o) for o in own)
        ids = torch.full((len(group), longest), self.pad, dtype=torch.long)
        mask = torch.zeros((len(group), longest), dtype=torch.long)
        for i, o in enumerate(own):
            ids[i, longest - len(o):] = torch.tensor(o, dtype=torch.long)
            mask[i, longest - len(o):] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        positions = (p0 + mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        self.stats.prefills += 1
        self.stats.prefill_tokens += ids.numel()
        prefill = DynamicCache(config=self.model.config)
        attention: torch.Tensor = mask
        if p0:
            for k, (keys, values) in enumerate(self.prefix):
                prefill.update(keys.expand(len(group), -1, -1, -1), values.expand(len(group), -1, -1, -1), k)
            causal = torch.ones(longest, longest, dtype=torch.bool, device=self.device).tril()
            own_part = causal[None, :, :] & mask.bool()[:, None, :]
            head = torch.ones(len(group), longest, p0, dtype=torch.bool, device=self.device)
            attention = self._mask(torch.cat([head, own_part], dim=-1)[:, None, :, :])
        out = self.model(input_ids=ids, attention_mask=attention, position_ids=positions, use_cache=True,
                         logits_to_keep=1, **{self.cache_arg: prefill})
        if self.cache is None:
            self.cache = allocate(prefill, self.shared, self.n_slots, self.length)
        assert self.cache is not None
        width = p0 + longest
        for i, (r, s) in enumerate(zip(group, free)):
            n = len(r.prompt)
            for layer, fresh in zip(self.cache.layers, prefill.layers):
                layer.keys[s, :, :p0] = fresh.keys[i, :, :p0]
                layer.values[s, :, :p0] = fresh.values[i, :, :p0]
                layer.keys[s, :, p0:n] = fresh.keys[i, :, width - (n - p0):]
                layer.values[s, :, p0:n] = fresh.values[i, :, width - (n - p0):]
            self.lens[s] = n
            self.slot_row[s] = r
        slots = torch.tensor(free[: len(group)], dtype=torch.long).to(self.device)
        self.shared.lens.index_copy_(0, slots, torch.tensor([len(r.prompt) for r in group], dtype=torch.long).to(self.device))
        self.live.index_fill_(0, slots, 1)
        if self.sampler is not None:
            self._sampler_join(group, slots, out.logits.shape[-1])
        self._advance(out.logits[:, -1, :], list(zip(free, group)), slots)

    def _sampler_join(self, group: list[Row], slots: torch.Tensor, vocab: int) -> None:
        """Rows join: their seeds, no token yet, and (with a repetition penalty) their prompts' tokens."""
        assert self.sampler is not None
        self.seeds.index_copy_(0, slots, torch.tensor([r.seed for r in group], dtype=torch.long).to(self.device))
        self.counts.index_fill_(0, slots, 0)
        if self.sampler.repetition_penalty == 1.0:
            return
        if self.seen is None:
            self.seen = torch.zeros((self.n_slots, vocab), dtype=torch.bool, device=self.device)
        longest = max(len(r.prompt) for r in group)
        ids = torch.tensor([r.prompt + r.prompt[:1] * (longest - len(r.prompt)) for r in group], dtype=torch.long)
        held = torch.zeros((len(group), vocab), dtype=torch.bool).scatter_(1, ids, True)
        self.seen.index_copy_(0, slots, held.to(self.device))

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """A 4D boolean mask (True: attend) as the model's attention takes it: SDPA as it is, eager
        as an additive float mask."""
        if self.mask_fill is None:
            return allowed
        return torch.zeros(allowed.shape, dtype=self.model.dtype, device=self.device).masked_fill(~allowed, self.mask_fill)


    # -- decode steps -----------------------------------------------------------------------

    def _step(self) -> None:
        s = self.shared
        s.fresh()
        s.width = max(self.lens[i] for i, r in enumerate(self.slot_row) if r is not None) + 1
        columns = torch.arange(s.width, device=self.device)
        mask = self._mask((columns[None, :] <= s.lens[:, None])[:, None, None, :])
        assert self.cache is not None
        if self.lean is not None:
            logits = self.lean(self.next_token, s.lens[:, None].clone(), mask, self.cache.layers)
        else:
            logits = self.model(input_ids=self.next_token, attention_mask=mask, position_ids=s.lens[:, None].clone(),
                                use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache}).logits[:, -1, :]
        active = [(i, r) for i, r in enumerate(self.slot_row) if r is not None]
        self.stats.steps += 1
        self.stats.row_steps += len(active)
        self.stats.slot_steps += self.n_slots
        s.lens += self.live
        for i, _ in active:
            self.lens[i] += 1
        self._advance(logits, active)

    def _advance(self, logits: torch.Tensor, placed: list[tuple[int, Row]], joined: torch.Tensor | None = None) -> None:
        """Pick each placed row's next token from its logits and end the rows that are done. In a
        decode step (``joined`` None) row k of ``logits`` is slot k's; in a prefill, the k-th
        placed row's, whose slots ``joined`` holds. The tokens are chosen on the device and go to
        the next step there; the host reads them once, for every row at once (a row with its own
        ``pick`` function reads its scores itself)."""
        step = joined is None
        scores = logits.float().to(self.device)  # the last layer's device may be another (device_map)
        young = [k if not step else slot for k, (slot, r) in enumerate(placed) if len(r.new) < self.min_new]
        if young:  # no end-of-sequence before min_new_tokens
            at = torch.tensor(young, dtype=torch.long).to(self.device)
            scores[at[:, None], self.eos_ids[None, :]] = float("-inf")
        if self.mask is not None and any(r.constraint is not None for _, r in placed):  # all rows' at once
            by_row: list[Any] = [None] * scores.shape[0]
            for k, (slot, r) in enumerate(placed):
                by_row[slot if step else k] = r.constraint
            self.mask(by_row, scores)
        tokens = self._choose(scores, joined)
        if step:
            self.next_token[:, 0] = tokens
        else:
            self.next_token.index_copy_(0, joined, tokens[:, None])
        greedy = tokens.tolist()  # the one read
        picked: list[tuple[int, int]] = []
        ended: list[int] = []
        for k, (slot, r) in enumerate(placed):
            at_row = slot if step else k
            if r.pick is None:
                token = greedy[at_row]
            else:
                token = r.pick(r.prompt + r.new, scores[at_row: at_row + 1])
                picked.append((slot, token))
            if token in self.eos or (r.constraint is not None and not r.constraint.accept(token)):
                self.slot_row[slot] = None  # its end, or a token its grammar refuses: the row ends (unmet)
                ended.append(slot)
                self.done.append(r)
                continue
            r.new.append(token)
            if len(r.new) >= self.max_new or (self.stopped is not None and self.stopped(r.new)):
                self.slot_row[slot] = None
                ended.append(slot)
                self.done.append(r)
        if step:
            self.stats.step_reads += 1 + len(picked)
        else:
            self.stats.prefill_reads += 1 + len(picked)
        if picked:  # their tokens, chosen on the host, to the device
            slots = torch.tensor([s for s, _ in picked], dtype=torch.long).to(self.device)
            self.next_token.index_copy_(0, slots, torch.tensor([[t] for _, t in picked], dtype=torch.long).to(self.device))
        if ended:  # free slots: no longer counted, their next token a pad
            slots = torch.tensor(ended, dtype=torch.long).to(self.device)
            self.live.index_fill_(0, slots, 0)
            self.shared.lens.index_fill_(0, slots, 0)
            self.next_token.index_fill_(0, slots, self.pad)
            for slot in ended:
                self.lens[slot] = 0

    def _choose(self, scores: torch.Tensor, joined: torch.Tensor | None) -> torch.Tensor:
        """Every row's token, on the device: the best one, or the sampler's (row k of ``scores`` is
        slot k's in a step, slot ``joined[k]``'s in a prefill); the sampler's state moves on."""
        if self.sampler is None:
            return scores.argmax(-1)
        if joined is None:
            tokens = self.sampler.choose(scores, self.seen, self.seeds, self.counts)
            self.counts += self.live
            if self.seen is not None:
                self.seen.scatter_(1, tokens[:, None], True)
            return tokens
        seen = self.seen.index_select(0, joined) if self.seen is not None else None
        tokens = self.sampler.choose(scores, seen, self.seeds.index_select(0, joined), self.counts.index_select(0, joined))
        self.counts.index_fill_(0, joined, 1)
        if self.seen is not None:
            self.seen.index_copy_(0, joined, seen.scatter_(1, tokens[:, None], True))
        return tokens

    def _shrink(self) -> None:
        """Few rows left and none waiting: drop the empty slots, so steps compute only live rows."""
        keep = [i for i, r in enumerate(self.slot_row) if r is not None]
        idx = torch.tensor(keep, device=self.device)
        assert self.cache is not None
        for layer in self.cache.layers:
            at = idx.to(layer.keys.device)
            layer.keys, layer.values = layer.keys.index_select(0, at), layer.values.index_select(0, at)
        self.shared.lens = self.shared.lens.index_select(0, idx)
        self.shared.rows = torch.arange(len(keep), device=self.device)
        self.next_token = self.next_token.index_select(0, idx)
        self.live = self.live.index_select(0, idx)
        self.lens = [self.lens[i] for i in keep]
        self.seeds, self.counts = self.seeds.index_select(0, idx), self.counts.index_select(0, idx)
        if self.seen is not None:
            self.seen = self.seen.index_select(0, idx)
        self.slot_row = [self.slot_row[i] for i in keep]
        self.n_slots = len(keep)


__all__ = ["DecodeStats", "Picker", "Row", "decode", "supports"]
