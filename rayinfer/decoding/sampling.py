"""Every row's next token chosen on the device, all rows at once: repetition penalty, temperature,
top-k and top-p as transformers' processors compute them (``RepetitionPenaltyLogitsProcessor``,
``TemperatureLogitsWarper``, ``TopKLogitsWarper``, ``TopPLogitsWarper``), then a draw, or the best
token when not sampling.

The draw is counter-based: a row's k-th new token takes the uniform number ``uniform(seed, k)``,
computed from the row's seed and k alone with integer arithmetic on the device (splitmix64), and
is the token where that number falls in the row's cumulative probabilities. No random generator
state is kept or shared, so a row's tokens depend on its seed and its own scores only: not on the
batch it lands in, its slot, the rows beside it, or the device (up to the last bits of the scores,
which kernels on other devices may round differently).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_C1 = 0xBF58476D1CE4E5B9 - (1 << 64)  # splitmix64's multipliers, as signed int64
_C2 = 0x94D049BB133111EB - (1 << 64)
_GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)


def _shr(x: torch.Tensor, k: int) -> torch.Tensor:
    """A logical right shift of int64 values (torch's >> keeps the sign)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors (multiplication wraps, as uint64's does)."""
    x = (x ^ _shr(x, 30)) * _C1
    x = (x ^ _shr(x, 27)) * _C2
    return x ^ _shr(x, 31)


def uniform(seeds: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """A float64 in (0, 1] per row from its seed and counter (int64 tensors of one shape)."""
    x = _mix(seeds + _mix(counters * _GOLDEN))
    return (_shr(x, 11).double() + 1.0) * 2.0**-53


@dataclass(frozen=True)
class Sampler:
    """How a decode chooses tokens beyond the plain best one (the generate task's options)."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @property
    def needed(self) -> bool:
        """False: the best token, unchanged (the loop's greedy path)."""
        return self.do_sample or self.repetition_penalty != 1.0

    def choose(self, scores: torch.Tensor, seen: torch.Tensor | None, seeds: torch.Tensor,
               counters: torch.Tensor) -> torch.Tensor:
        """Each row's token from its ``scores`` [rows, vocab] (float32): ``seen`` [rows, vocab]
        marks the tokens already in the row (prompt and new), for the repetition penalty;
        ``seeds`` and ``counters`` [rows] (int64) give each row's draw."""
        scores = self.process(scores, seen)
        if not self.do_sample:
            return scores.argmax(-1)
        cdf = scores.softmax(dim=-1).double().cumsum(dim=-1)
        u = uniform(seeds, counters).to(cdf.device) * cdf[:, -1]
        return torch.searchsorted(cdf, u[:, None]).squeeze(1).clamp_(max=scores.shape[-1] - 1)

    def process(self, scores: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """The scores the draw (or the best token) is taken from: penalty, temperature, top-k, top-p."""
        if self.repetition_penalty != 1.0 and seen is not None:
            p = self.repetition_penalty
            scores = torch.where(seen, torch.where(scores < 0, scores * p, scores / p), scores)
        if not self.do_sample:
            return scores
        if self.temperature != 1.0:
            scores = scores / self.temperature
        if self.top_k:
            kth = torch.topk(scores, min(self.top_k, scores.shape[-1]))[0][..., -1, None]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if self.top_p < 1.0:
            ordered, order = torch.sort(scores, descending=False)
            cumulative = ordered.softmax(dim=-1).cumsum(dim=-1)
            drop = cumulative <= (1 - self.top_p)
            drop[..., -1:] = False  # at least one token stays
            scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
        return scores


__all__ = ["Sampler", "uniform"]
