"""`synth/llm/kv_cache.py`: the in-place KV cache gives `generate` the same tokens as transformers' own
DynamicCache, allocates each layer once per call instead of once per step, and copes with the cache
operations that replace or crop its tensors."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from synth.llm.kv_cache import InPlaceLayer, cache_argument, in_place, in_place_cache


@pytest.fixture(scope="module")
def model(tiny_model_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _inputs():
    torch.manual_seed(0)
    ids = torch.randint(5, 200, (3, 9))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    return ids, mask


def _generate(model, cache_kwargs, sample: bool):
    ids, mask = _inputs()
    torch.manual_seed(7)
    extra = {"do_sample": True, "top_k": 0, "top_p": 1.0} if sample else {"do_sample": False}
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=16,
        min_new_tokens=16,
        pad_token_id=0,
        **extra,
        **cache_kwargs,
    )
    return out[:, ids.shape[1] :]


@pytest.mark.parametrize("sample", [False, True])
def test_same_tokens_as_dynamic_cache(model, sample):
    assert torch.equal(_generate(model, {}, sample), _generate(model, in_place_cache(model, 16), sample))


def test_each_layer_allocates_once_per_generate(model, monkeypatch):
    calls = []
    original = InPlaceLayer._allocate

    def counting(self, n, capacity, keys, values):
        calls.append((id(self), capacity))
        return original(self, n, capacity, keys, values)

    monkeypatch.setattr(InPlaceLayer, "_allocate", counting)
    kwargs = in_place_cache(model, 16)
    _generate(model, kwargs, sample=True)
    (cache,) = kwargs.values()
    layers = [layer for layer in cache.layers if isinstance(layer, InPlaceLayer)]
    assert len(layers) == model.config.num_hidden_layers
    assert len(calls) == len(layers)  # 16 decoding steps, one buffer per layer
    assert {c for _, c in calls} == {9 + 16}
    assert all(layer.keys.shape[-2] == 9 + 15 for layer in layers)  # the last drawn token is never fed back


def test_prefilled_cache_keeps_values_and_repeat_reallocates():
    layer = dynamic_layer_with(torch.arange(2 * 1 * 3 * 2, dtype=torch.float32).view(2, 1, 3, 2))
    cache = DynamicCache()
    cache.layers = [layer]
    in_place(cache, room=4)
    new = cache.layers[0]
    assert isinstance(new, InPlaceLayer)
    before = new.keys.clone()
    cache.batch_repeat_interleave(2)  # replaces keys with a new tensor of 4 rows
    k, _ = new.update(torch.full((4, 1, 1, 2), -1.0), torch.full((4, 1, 1, 2), -1.0))
    assert k.shape == (4, 1, 4, 2)
    assert torch.equal(k[:, :, :3], before.repeat_interleave(2, 0))
    assert torch.equal(k[:, :, 3], torch.full((4, 1, 2), -1.0))
    assert new._k.shape[0] == 4


def test_crop_then_update_overwrites_the_cropped_positions():
    layer = InPlaceLayer(room=8)
    layer.update(torch.ones(1, 1, 5, 2), torch.ones(1, 1, 5, 2))
    buffer = layer._k
    layer.crop(-2)
    k, _ = layer.update(torch.zeros(1, 1, 1, 2), torch.zeros(1, 1, 1, 2))
    assert layer._k is buffer  # the same buffer: no copy
    assert k.shape[-2] == 4 and torch.equal(k[0, 0, :3], torch.ones(3, 2)) and torch.equal(k[0, 0, 3], torch.zeros(2))


def test_grows_past_its_room():
    layer = InPlaceLayer(room=1)
    layer.update(torch.ones(1, 1, 2, 2), torch.ones(1, 1, 2, 2))
    layer.update(torch.full((1, 1, 1, 2), 2.0), torch.full((1, 1, 1, 2), 2.0))
    k, v = layer.update(torch.full((1, 1, 2, 2), 3.0), torch.full((1, 1, 2, 2), 3.0))
    assert k.shape[-2] == 5 and torch.equal(k[0, 0, :, 0], torch.tensor([1.0, 1.0, 2.0, 3.0, 3.0]))
    assert torch.equal(k, v)


def test_other_cache_implementations_are_left_to_generate(model, monkeypatch):
    monkeypatch.setattr(model.generation_config, "cache_implementation", "static")
    assert in_place_cache(model, 4) == {}


def test_cache_argument_names_the_forward_keyword(model):
    assert cache_argument(model) in ("cache", "past_key_values")
    import inspect

    assert cache_argument(model) in inspect.signature(model.forward).parameters


def dynamic_layer_with(keys):
    from transformers.cache_utils import DynamicLayer

    layer = DynamicLayer()
    layer.update(keys, keys.clone())
    return layer


def test_values_may_have_another_head_dim_than_keys():
    layer = InPlaceLayer(room=3)
    k, v = layer.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 6))
    k, v = layer.update(torch.zeros(1, 2, 1, 4), torch.zeros(1, 2, 1, 6))
    assert k.shape == (1, 2, 3, 4) and v.shape == (1, 2, 3, 6)
    assert torch.equal(v[0, 0, :, 0], torch.tensor([1.0, 1.0, 0.0]))
