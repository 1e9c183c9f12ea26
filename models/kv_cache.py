"""A KV cache that writes each step into preallocated buffers instead of re-concatenating.

transformers' `DynamicCache` grows every layer's keys and values by ``torch.cat`` at each step,
so drawing L tokens copies O(L²) cache entries: half of `CausalLM.sample_batch`'s time on CPU
(bench/sampling_throughput.py). Here each full-attention layer allocates room for the whole
draw once and hands attention a view of its filled prefix; sliding-window and other special
layers keep transformers' own classes.
"""

from __future__ import annotations

import torch
from transformers import PreTrainedModel

try:  # transformers 5 (and late 4.x) builds caches from per-layer objects
    from transformers.cache_utils import DynamicCache, DynamicLayer
except ImportError:  # older releases: the model makes its own cache
    DynamicCache = DynamicLayer = None


if DynamicLayer is not None:

    class PreallocatedLayer(DynamicLayer):
        """A full-attention layer whose keys/values are views of buffers of ``capacity``
        positions; writing past it doubles the buffers (never silently wrong, only slower)."""

        is_croppable = False

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self.key_buffer: torch.Tensor | None = None
            self.value_buffer: torch.Tensor | None = None

        def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor]:
            end = self.length + key_states.shape[-2]
            if self.key_buffer is None:
                self.is_initialized, self.device = True, key_states.device
                self.key_buffer = self._room(key_states, max(self.capacity, end))
                self.value_buffer = self._room(value_states, max(self.capacity, end))
            elif end > self.key_buffer.shape[-2]:
                self.key_buffer = self._grown(self.key_buffer, end)
                self.value_buffer = self._grown(self.value_buffer, end)
            self.key_buffer[..., self.length:end, :] = key_states
            self.value_buffer[..., self.length:end, :] = value_states
            self.length = end
            self.keys = self.key_buffer[..., :end, :]
            self.values = self.value_buffer[..., :end, :]
            return self.keys, self.values

        def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
            if self.key_buffer is not None:
                index = beam_idx.to(self.key_buffer.device)
                self.key_buffer = self.key_buffer.index_select(0, index)
                self.value_buffer = self.value_buffer.index_select(0, index)
                self.keys = self.key_buffer[..., :self.length, :]
                self.values = self.value_buffer[..., :self.length, :]

        @staticmethod
        def _room(states: torch.Tensor, positions: int) -> torch.Tensor:
            shape = (*states.shape[:-2], positions, states.shape[-1])
            return states.new_empty(shape)

        def _grown(self, buffer: torch.Tensor, end: int) -> torch.Tensor:
            grown = self._room(buffer, max(end, 2 * buffer.shape[-2]))
            grown[..., :self.length, :] = buffer[..., :self.length, :]
            return grown


def preallocated_cache(model: PreTrainedModel, capacity: int):
    """A cache for ``model`` holding ``capacity`` positions per full-attention layer without
    re-allocation, or None (the model's default cache) where this transformers has no
    per-layer caches."""
    if DynamicLayer is None:
        return None
    cache = DynamicCache(config=model.config)
    if not cache.layers:  # a config transformers cannot read layer types from
        return None
    cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
                    for layer in cache.layers]
    return cache
