"""A per-segment, per-session key/value cache that can be cropped.

transformers' attention modules only call ``cache.update(keys, values, layer_idx, ...)``, so a
small class of our own is enough, and it gives us two things ``DynamicCache`` does not:

* storage grows by doubling instead of ``torch.cat`` on every step (decode stays O(1) in copies);
* ``crop(n)`` is a length change, needed for speculative rollback and for failover replay.

Layers are addressed by their *global* index (``self_attn.layer_idx``), so a segment that holds
layers ``[lo, hi)`` never has to renumber the transformers modules it borrows.
"""

from __future__ import annotations

from typing import Any

import torch

# First allocation per layer, in tokens. Doubling from here costs a handful of copies per
# generation; a prompt longer than this allocates its exact size rounded up to a power of two.
_INITIAL_CAPACITY_TOKENS = 256


class _LayerStore:
    __slots__ = ("keys", "values", "length")

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        self.keys = keys  # (B, kv_heads, capacity, head_dim)
        self.values = values
        self.length = 0


class SegmentKVCache:
    """Keys and values of one session for the layers of one segment."""

    def __init__(self, max_length_tokens: int | None = None) -> None:
        self._layers: dict[int, _LayerStore] = {}
        self._nbytes: int | None = 0  # what the stores hold, counted again after one is allocated or grown
        self._length = 0
        self.max_length_tokens = max_length_tokens

    # --- the interface transformers' attention calls -------------------------------------
    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # key_states: (B, kv_heads, T_new, head_dim)
        store, start = self.reserve(layer_idx, key_states, value_states)
        needed = store.length
        store.keys[..., start:needed, :] = key_states
        store.values[..., start:needed, :] = value_states
        return store.keys[..., :needed, :], store.values[..., :needed, :]

    def reserve(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor) -> tuple[_LayerStore, int]:
        """Room for ``key_states``' new positions in layer ``layer_idx``'s store (allocated or
        grown as ``update`` would), counted as held: ``(store, first new position)``. The caller
        writes them (``update``, or the packed step's attention kernel, which writes them itself)."""
        store = self._layers.get(layer_idx)
        t_new = key_states.shape[-2]
        if store is None:
            store = self._allocate(key_states, value_states, t_new)
            self._layers[layer_idx] = store
            self._nbytes = None
        start = store.length
        needed = start + t_new
        if self.max_length_tokens is not None and needed > self.max_length_tokens:
            raise CacheFullError(
                f"session would hold {needed} tokens, over this cache's limit of {self.max_length_tokens}"
            )
        if needed > store.keys.shape[-2]:
            store.keys = _grow(store.keys, needed)
            store.values = _grow(store.values, needed)
            self._nbytes = None
        store.length = needed
        return store, start

    # --- ours ------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        """Positions this session has processed. Kept apart from the layer stores because a
        segment with no layers (the edge at split 0) still has to count positions."""
        return self._length

    def advance(self, n_tokens: int) -> None:
        """Called by the segment after a forward pass over ``n_tokens`` new positions."""
        self._length += n_tokens

    def crop(self, length: int) -> None:
        """Forget every position at or after ``length`` (speculative rollback, replay)."""
        if length < 0:
            raise ValueError(f"cannot crop a cache to a negative length ({length})")
        self._length = min(self._length, length)
        for store in self._layers.values():
            store.length = min(store.length, length)

    def keep(self, start: int, rows: list[int]) -> None:
        """Keep positions ``[0, start)`` and, after them, the positions ``start + r`` for ``r`` in
        ``rows`` (ascending), forgetting the rest: a token tree's accepted path, moved to where a
        plain sequence would have put it (``partition/tree.py``)."""
        if list(rows) != sorted(set(rows)) or any(not 0 <= r < self._length - start for r in rows):
            raise ValueError(f"rows {rows} are not ascending positions after {start} of {self._length}")
        if rows == list(range(len(rows))):
            self.crop(start + len(rows))
            return
        with torch.inference_mode():  # the stores are inference tensors (written in forward passes)
            for store in self._layers.values():
                index = torch.tensor([start + r for r in rows], device=store.keys.device)
                store.keys[..., start:start + len(rows), :] = store.keys.index_select(-2, index)
                store.values[..., start:start + len(rows), :] = store.values.index_select(-2, index)
                store.length = start + len(rows)
        self._length = start + len(rows)

    def repeated(self, batch: int) -> SegmentKVCache:
        """A copy whose positions are this (batch-1) cache's, repeated ``batch`` times along the
        batch dimension: to run several continuations of one prefix in one forward pass
        (``partition/leakage.py`` tries candidate tokens this way)."""
        out = SegmentKVCache(self.max_length_tokens)
        out._length = self._length
        for idx, s in self._layers.items():
            if s.keys.shape[0] != 1:
                raise ValueError(f"only a batch-1 cache can be repeated, this one has batch {s.keys.shape[0]}")
            store = _LayerStore(s.keys[..., : s.length, :].repeat(batch, 1, 1, 1),
                                s.values[..., : s.length, :].repeat(batch, 1, 1, 1))
            store.length = s.length
            out._layers[idx] = store
        out._nbytes = None
        return out

    def row(self, index: int) -> SegmentKVCache:
        """A batch-1 copy of row ``index`` of this (batched) cache: after trying several
        continuations with ``repeated``, keep the chosen one without recomputing it."""
        out = SegmentKVCache(self.max_length_tokens)
        out._length = self._length
        for idx, s in self._layers.items():
            if not 0 <= index < s.keys.shape[0]:
                raise IndexError(f"row {index} of a batch-{s.keys.shape[0]} cache")
            store = _LayerStore(s.keys[index : index + 1, ..., : s.length, :].clone(),
                                s.values[index : index + 1, ..., : s.length, :].clone())
            store.length = s.length
            out._layers[idx] = store
        out._nbytes = None
        return out

    def nbytes(self) -> int:
        """Bytes its stores hold (allocated, not just filled). Asked by a worker every pass for
        every session: counted once per allocation."""
        if self._nbytes is None:
            self._nbytes = sum(s.keys.nelement() * s.keys.element_size() * 2 for s in self._layers.values())
        return self._nbytes

    def capacity(self) -> int:
        """Positions its storage holds before it grows (0 before the first update)."""
        return max((s.keys.shape[-2] for s in self._layers.values()), default=0)

    def capacity_for(self, length: int) -> int:
        """The capacity it will have once it holds ``length`` positions (what ``update`` allocates)."""
        current = self.capacity()
        if current == 0:
            return self._first_capacity(length)
        return current if length <= current else _next_pow2(length)

    def _first_capacity(self, t_new: int) -> int:
        capacity = max(_INITIAL_CAPACITY_TOKENS, _next_pow2(t_new))
        if self.max_length_tokens is not None:
            capacity = min(capacity, max(self.max_length_tokens, t_new))
        return capacity

    def _allocate(self, keys: torch.Tensor, values: torch.Tensor, t_new: int) -> _LayerStore:
        capacity = self._first_capacity(t_new)
        shape_k = (*keys.shape[:-2], capacity, keys.shape[-1])
        shape_v = (*values.shape[:-2], capacity, values.shape[-1])
        return _LayerStore(
            keys.new_empty(shape_k),
            values.new_empty(shape_v),
        )


class CacheFullError(RuntimeError):
    """A session's cache reached its configured maximum length."""


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _grow(t: torch.Tensor, needed: int) -> torch.Tensor:
    new_cap = _next_pow2(needed)
    out = t.new_empty((*t.shape[:-2], new_cap, t.shape[-1]))
    out[..., : t.shape[-2], :] = t
    return out
