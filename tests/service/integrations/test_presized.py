"""integrations/presized.py: a DynamicCache layer over K/V buffers with room. Appends write into the room
(the same memory, no copy of the cache), outgrowing it moves once to larger buffers, crop gives the room
back, and a layer whose tensors another method replaced appends as DynamicLayer does."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from kvtier.service.integrations import hf
from kvtier.service.integrations.presized import PresizedLayer


def _kv(tokens: int, capacity: int, seed: int = 0) -> torch.Tensor:
    kv = torch.full((2, 2, 3, capacity, 4), float("nan"))
    kv[:, :, :, :tokens] = torch.randn((2, 2, 3, tokens, 4), generator=torch.Generator().manual_seed(seed))
    return kv


def _reference(kv: torch.Tensor, tokens: int) -> DynamicLayer:
    ref = DynamicLayer()
    ref.update(kv[0, 0, :, :tokens].unsqueeze(0).clone(), kv[1, 0, :, :tokens].unsqueeze(0).clone())
    return ref


def test_appends_land_in_the_room_and_match_dynamic_layer():
    kv = _kv(10, 16)
    cache = hf.kv_to_cache(kv, 10)
    ref = _reference(kv, 10)
    layer = cache.layers[0]
    assert isinstance(layer, PresizedLayer) and cache.get_seq_length() == 10 and layer.capacity == 16
    for step in (4, 2):  # fills the room exactly
        new_k, new_v = torch.randn(1, 3, step, 4), torch.randn(1, 3, step, 4)
        keys, values = cache.update(new_k, new_v, 0)
        want_k, want_v = ref.update(new_k, new_v)
        assert torch.equal(keys, want_k) and torch.equal(values, want_v)
        assert keys.data_ptr() == kv[0, 0].data_ptr()  # still the destination's memory
    keys, _ = cache.update(torch.ones(1, 3, 1, 4), torch.ones(1, 3, 1, 4), 0)  # past the room
    assert keys.shape[2] == 17 and keys.data_ptr() != kv[0, 0].data_ptr() and layer.capacity >= 17 + 64
    assert torch.equal(keys[:, :, :16], ref.keys)


def test_crop_gives_room_back_and_a_deep_copy_is_independent():
    kv = _kv(12, 14)
    cache = hf.kv_to_cache(kv, 12)
    before = kv[0, 1, :, :12].clone()
    twin = copy.deepcopy(cache)
    cache.crop(-4)
    assert cache.get_seq_length() == 8
    new = torch.zeros(1, 3, 6, 4)
    keys, _ = cache.update(new, new, 1)
    assert keys.shape[2] == 14 and keys.data_ptr() == kv[0, 1].data_ptr()  # 8 + 6 fit the 14
    assert twin.get_seq_length() == 12 and torch.equal(twin.layers[1].keys[0], before)  # its own memory
    assert twin.layers[1].keys.data_ptr() != kv[0, 1].data_ptr()


def test_a_layer_whose_tensors_were_replaced_appends_by_copy():
    kv = _kv(5, 20)
    cache = hf.kv_to_cache(kv, 5)
    cache.batch_select_indices(torch.tensor([0]))  # replaces every layer's tensors
    layer = cache.layers[0]
    assert layer.capacity == 0
    keys, _ = cache.update(torch.ones(1, 3, 2, 4), torch.ones(1, 3, 2, 4), 0)
    assert keys.shape[2] == 7 and keys.data_ptr() != kv[0, 0].data_ptr()
    assert torch.equal(keys[:, :, :5], kv[0, 0, :, :5].unsqueeze(0))


def test_bad_buffers_are_refused():
    with pytest.raises(ValueError):
        PresizedLayer(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 5, 8), 3)
    with pytest.raises(ValueError):
        PresizedLayer(torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8), 5)
