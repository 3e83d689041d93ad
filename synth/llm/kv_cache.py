"""A KV cache that is written in place during decoding, for transformers' `generate`.

transformers' default `DynamicCache` grows each layer with `torch.cat([keys, new], dim=-2)` at every
decoding step, so step t copies the whole cache of t tokens: O(T²) memory traffic for T new tokens and a
fresh allocation per layer per step. On a CPU that copying was 28 % of the online loops' generation time
(py-spy, 20M-parameter Llama, 32 rows × 64 new tokens). `InPlaceLayer` allocates each layer's keys and
values once, for the tokens already cached plus `room` more, and writes each step's keys into that buffer;
attention reads a view of the filled prefix. The tokens drawn are the same as with `DynamicCache` (the
attention inputs are equal, only their storage differs; tested).

Unlike transformers' `StaticCache`, the attention still spans only the filled positions (no masked
compute over the unused tail), and nothing about the model or `generate` changes: the cache is an
ordinary `DynamicCache` whose full-attention layers are `InPlaceLayer`s. Sliding-window layers and
offloaded caches are left as transformers builds them.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class InPlaceLayer(DynamicLayer):
    """A `DynamicLayer` whose `keys`/`values` are prefix views of buffers with room for `room` more
    tokens. An operation that replaces them with new tensors (`batch_repeat_interleave`, beam reordering,
    `batch_select_indices`) is noticed at the next update, which then copies them into a new buffer once;
    `crop` keeps the view, and the next update overwrites the cropped positions."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = max(int(room), 0)
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, s = self.keys.shape[-2] if self.keys.dim() == 4 else 0, key_states.shape[-2]
        if not self._holds(n + s, key_states):
            self._allocate(n, n + s + self.room, key_states, value_states)
        assert self._k is not None and self._v is not None
        self._k[:, :, n : n + s].copy_(key_states)
        self._v[:, :, n : n + s].copy_(value_states)
        self.keys, self.values = self._k[:, :, : n + s], self._v[:, :, : n + s]
        return self.keys, self.values

    def _holds(self, length: int, new: torch.Tensor) -> bool:
        """Whether `keys` is still the prefix view of the buffer and the buffer fits `length` tokens."""
        k = self._k
        return (
            k is not None
            and length <= k.shape[-2]
            and self.keys.data_ptr() == k.data_ptr()
            and self.keys.shape[:2] == k.shape[:2] == new.shape[:2]
            and self.keys.stride() == k.stride()
            and new.dtype == k.dtype
            and new.device == k.device
        )

    def _allocate(self, n: int, capacity: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        # keys and values may differ in head dim (e.g. multi-head latent attention)
        self._k = keys.new_empty(*keys.shape[:2], capacity, keys.shape[-1])
        self._v = values.new_empty(*values.shape[:2], capacity, values.shape[-1])
        if n:
            self._k[:, :, :n].copy_(self.keys)
            self._v[:, :, :n].copy_(self.values)


def in_place(cache: DynamicCache, room: int) -> DynamicCache:
    """Turn `cache`'s full-attention `DynamicLayer`s into `InPlaceLayer`s with room for `room` more tokens
    (their cached keys/values are copied once), and make the layers it creates lazily `InPlaceLayer`s too.
    Returns the same cache object."""
    if getattr(cache, "offloading", False):
        return cache
    with torch.no_grad():
        for i, layer in enumerate(cache.layers):
            if type(layer) is not DynamicLayer:
                continue
            new = InPlaceLayer(room)
            if layer.is_initialized and layer.keys.dim() == 4:
                new.update(layer.keys, layer.values)
            cache.layers[i] = new
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = lambda: InPlaceLayer(room)
    return cache


def cache_argument(model: Any) -> str:
    """The keyword under which `model`'s forward (and `generate`) takes a cache: `cache` from transformers
    5.x, `past_key_values` before."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def in_place_cache(model: Any, room: int) -> dict[str, DynamicCache]:
    """`generate` keyword arguments with an empty cache that preallocates each full-attention layer for the
    prompt plus `room` tokens at its first update; {} (generate builds its own cache) for a model that does
    not take a `DynamicCache` (an encoder-decoder, a recurrent model) or whose generation config names
    another cache implementation (static, quantized, offloaded)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    supports = getattr(base, "_supports_default_dynamic_cache", None)
    implementation = getattr(getattr(base, "generation_config", None), "cache_implementation", None)
    if (
        config is None
        or getattr(config, "is_encoder_decoder", False)
        or (supports is not None and not supports())
        or implementation not in (None, "dynamic")
    ):
        return {}
    try:
        cache = DynamicCache(config=config.get_text_config(decoder=True))
    except TypeError:  # transformers releases whose DynamicCache takes no config
        cache = DynamicCache()
    return {cache_argument(model): in_place(cache, room)}
