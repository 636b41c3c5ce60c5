"""The batch's KV cache: one preallocated slab per layer that rows join and leave between decode steps.

Layout: every row's tokens end at the same column (the batch's length T), so the next token of every row is written
to column T and one `cache_position` serves the whole batch. Shorter rows are left-padded with masked columns. A
prompt-learning prefix (soft prompt or prefix KV) sits in the columns before the prompt. transformers'
`DynamicLayer` concatenates on every token, copying the whole cache each step (cost growing with length);
`SlabLayer` writes into spare capacity instead and grows by half its size when full.

Joining: the newcomers are prefilled in a cache of their own, then both caches are left-padded to the longer length
and stacked along the batch. Leaving: the remaining rows are copied out, dropping leading columns no row uses.
Both copy the cache once per event, never per step.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_SPARE = 64  # columns of spare capacity after a rebuild, so the next tokens need no regrowth


class SlabLayer(DynamicLayer):
    """A DynamicLayer whose keys/values are views of a larger buffer: appends write in place."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None, spare: int = MIN_SPARE):
        super().__init__()
        self.length = 0
        self._k = self._v = None
        if keys is not None:
            self.lazy_initialization(keys, values)
            self._reserve(keys, values, keys.shape[-2] + spare)
            self._write(keys, values)

    def _reserve(self, key_like: torch.Tensor, value_like: torch.Tensor, capacity: int) -> None:
        """Buffers of `capacity` columns shaped like the given states, holding what is cached so far."""
        k = key_like.new_empty((*key_like.shape[:2], capacity, key_like.shape[3]))
        v = value_like.new_empty((*value_like.shape[:2], capacity, value_like.shape[3]))
        if self.length:
            k[:, :, :self.length] = self._k[:, :, :self.length]
            v[:, :, :self.length] = self._v[:, :, :self.length]
        self._k, self._v = k, v

    def _write(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        end = self.length + keys.shape[-2]
        self._k[:, :, self.length:end] = keys
        self._v[:, :, self.length:end] = values
        self.length = end
        self.keys, self.values = self._k[:, :, :end], self._v[:, :, :end]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        need = self.length + key_states.shape[-2]
        if self._k is None or need > self._k.shape[-2]:
            self._reserve(key_states, value_states, need + max(MIN_SPARE, need // 2))
        self._write(key_states, value_states)
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0


def empty_cache() -> Cache:
    """A cache that makes a SlabLayer for each model layer on first use."""
    return Cache(layer_class_to_replicate=SlabLayer)


def cache_from_tensors(kv: list[tuple[torch.Tensor, torch.Tensor]], spare: int = MIN_SPARE) -> Cache:
    return Cache(layers=[SlabLayer(k, v, spare) for k, v in kv])


def tensors_of(cache: Cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in cache.layers]


def left_pad(t: torch.Tensor, n: int) -> torch.Tensor:
    """Add n columns on the left of the sequence axis (-2) of [B, H, T, D]; their content is masked anyway."""
    if n == 0:
        return t
    return torch.cat([t.new_zeros((*t.shape[:2], n, t.shape[3])), t], dim=2)


def join(a: Cache, b: Cache) -> Cache:
    """Rows of `a` then rows of `b`, both right-aligned to the longer length."""
    ta, tb = a.get_seq_length(), b.get_seq_length()
    t = max(ta, tb)
    kv = [(torch.cat([left_pad(ka, t - ta), left_pad(kb, t - tb)]), torch.cat([left_pad(va, t - ta),
                                                                                 left_pad(vb, t - tb)]))
          for (ka, va), (kb, vb) in zip(tensors_of(a), tensors_of(b))]
    return cache_from_tensors(kv)


def select(cache: Cache, rows: torch.Tensor, drop_columns: int = 0) -> Cache:
    """Only `rows` (indices), without the first `drop_columns` columns (padding no remaining row uses)."""
    kv = [(k[rows, :, drop_columns:], v[rows, :, drop_columns:]) for k, v in tensors_of(cache)]
    return cache_from_tensors(kv)


def prefix_cache(prefixes: list[list[tuple[torch.Tensor, torch.Tensor]] | None]) -> Cache:
    """A cache holding each row's prompt-learning prefix ([1, H, n_r, D] per layer, or None for no prefix),
    right-aligned to the longest: rows start [pad][prefix]. Returns an empty cache when no row has one."""
    longest = max((p[0][0].shape[-2] for p in prefixes if p), default=0)
    if longest == 0:
        return empty_cache()
    template = next(p for p in prefixes if p)
    kv = []
    for layer, (k0, v0) in enumerate(template):
        ks, vs = [], []
        for p in prefixes:
            k, v = (p[layer] if p else (k0[:, :, :0], v0[:, :, :0]))
            ks.append(left_pad(k, longest - k.shape[-2]))
            vs.append(left_pad(v, longest - v.shape[-2]))
        kv.append((torch.cat(ks), torch.cat(vs)))
    return cache_from_tensors(kv)
