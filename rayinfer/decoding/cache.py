"""The decode loop's KV cache: a preallocated slot per row (``SlotLayer``, one per model layer,
sharing ``Slots``: the rows' lengths and the columns a step attends over), and which models can
use it (``supports``)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache, DynamicLayer


@dataclass
class Slots:
    """What every layer's cache shares: the rows' lengths, the columns a step attends over."""

    lens: torch.Tensor  # [slots] tokens cached per slot
    rows: torch.Tensor  # [slots] arange, to index the write
    width: int = 1  # columns a step reads: the longest slot + the new token
    copies: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    def at(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(rows, lens) on ``device``: a model placed across devices (device_map) keeps each
        layer's cache on that layer's device; one copy per device per step (``fresh`` clears them)."""
        if self.lens.device == device:
            return self.rows, self.lens
        if device not in self.copies:
            self.copies[device] = (self.rows.to(device), self.lens.to(device))
        return self.copies[device]

    def fresh(self) -> None:
        """The lengths changed (a step, a join): the other devices' copies are stale."""
        self.copies.clear()


class SlotLayer(CacheLayerMixin):
    """One layer's cache: keys and values [slots, heads, length, dim], a row per slot from column 0."""

    is_compileable = False
    is_sliding = False

    def __init__(self, shared: Slots, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.shared, self.keys, self.values = shared, keys, values
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("slot caches are allocated up front")

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.shared
        rows, lens = s.at(self.keys.device)
        self.keys[rows, :, lens] = key_states[:, :, 0]
        self.values[rows, :, lens] = value_states[:, :, 0]
        return self.keys[:, :, : s.width], self.values[:, :, : s.width]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.shared.width, 0

    def get_seq_length(self) -> int:
        return self.shared.width - 1

    def get_max_length(self) -> int:
        return int(self.keys.shape[2])


def allocate(prefill: DynamicCache, shared: Slots, n_slots: int, length: int) -> Cache:
    """A slot cache of ``n_slots`` rows of ``length`` columns, shaped like ``prefill``'s layers, each
    on its layer's device (a model placed across GPUs keeps each layer's KV there). Zeros, not
    empty: a masked column's value still enters attention's sum, weighted 0 (0 x NaN is NaN)."""
    layers = []
    for fresh in prefill.layers:
        _, heads, _, dk = fresh.keys.shape
        keys = torch.zeros((n_slots, heads, length, dk), dtype=fresh.keys.dtype, device=fresh.keys.device)
        values = torch.zeros((n_slots, heads, length, fresh.values.shape[-1]), dtype=fresh.values.dtype,
                             device=fresh.values.device)
        layers.append(SlotLayer(shared, keys, values))
    return Cache(layers=layers)


def grow(cache: Cache, length: int) -> None:
    """Every layer's slots to ``length`` columns, what they hold kept (a longer row is joining)."""
    for layer in cache.layers:
        for name in ("keys", "values"):
            old = getattr(layer, name)
            new = old.new_zeros((*old.shape[:2], length, old.shape[3]))
            new[:, :, : old.shape[2]] = old
            setattr(layer, name, new)


def cache_arg(model: Any) -> str:
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def supports(model: Any, longest: int | None = None) -> bool:
    """Whether ``decode`` can run this model (else use ``model.generate``)."""
    config = model.config
    if getattr(config, "is_encoder_decoder", False):
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    params = inspect.signature(model.forward).parameters
    if not ({"cache", "past_key_values"} & set(params)) or "position_ids" not in params:
        return False
    window = getattr(config, "sliding_window", None)
    if window and (longest is None or longest > window):
        return False
    try:
        layers = DynamicCache(config=config).layers
    except Exception:
        return False
    return all(type(layer) is DynamicLayer for layer in layers)
