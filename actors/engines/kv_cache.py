"""A KV cache that appends in place: the HF engines' decode loop without a full copy of the cache per token.

transformers' DynamicLayer grows by `torch.cat`, which copies every row's keys and values at every decoded token
(about an eighth of a beam-search step on CPU). GrowingLayer keeps them in a buffer with spare room along the
sequence and hands attention a view of the filled part; the buffer doubles when full, so a row of T tokens costs
O(T) copies instead of O(T^2).
"""
from __future__ import annotations

from transformers.cache_utils import DynamicCache, DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose `update` writes into spare capacity instead of concatenating."""

    min_room = 64  # tokens of spare room a (re)allocation leaves at least

    def lazy_initialization(self, key_states, value_states) -> None:
        super().lazy_initialization(key_states, value_states)
        self._k = self._v = None
        self._len = 0

    def _reserve(self, need: int, key_states, value_states) -> None:
        """Room for `need` tokens: a buffer shaped like the new states (doubling, at least `min_room` spare)."""
        cap = 0 if self._k is None else self._k.shape[-2]
        if need <= cap:
            return
        new_cap = max(need + self.min_room, 2 * cap)
        b, h, _, _ = key_states.shape
        k = key_states.new_empty((b, h, new_cap, key_states.shape[-1]))
        v = value_states.new_empty((b, value_states.shape[1], new_cap, value_states.shape[-1]))
        if self._len:
            k[:, :, : self._len] = self._k[:, :, : self._len]
            v[:, :, : self._len] = self._v[:, :, : self._len]
        self._k, self._v = k, v

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        self._reserve(self._len + n, key_states, value_states)
        self._k[:, :, self._len: self._len + n] = key_states
        self._v[:, :, self._len: self._len + n] = value_states
        self._len += n
        self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]
        return self.keys, self.values

    def batch_select_indices(self, indices) -> None:
        if self.get_seq_length() > 0:
            self._k, self._v = self._k[indices], self._v[indices]
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.get_seq_length() > 0:
            self._k = self._k.repeat_interleave(repeats, dim=0)
            self._v = self._v.repeat_interleave(repeats, dim=0)
            self.keys, self.values = self._k[:, :, : self._len], self._v[:, :, : self._len]

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("GrowingLayer does not crop (ponder's engines never need it)")

    def reset(self) -> None:
        self._k = self._v = None
        self._len = 0
        super().reset()


def growing_cache(layers: list | None = None) -> DynamicCache:
    """A DynamicCache of GrowingLayers, optionally filled with [(keys, values)] per layer."""
    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    for i, (k, v) in enumerate(layers or []):
        cache.update(k, v, i)
    return cache
