"""GrowingLayer: the HF engines' in-place KV cache gives what transformers' DynamicLayer gives, without a copy per token."""
import torch
from transformers.cache_utils import DynamicCache

from actors.engines.kv_cache import GrowingLayer, growing_cache


def _kv(b, t, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, 2, t, 8, generator=g), torch.randn(b, 2, t, 8, generator=g)


def test_growing_cache_matches_dynamic_cache_through_updates_and_row_drops():
    ref, new = DynamicCache(), growing_cache()
    k, v = _kv(4, 30, 0)
    for c in (ref, new):
        c.update(k, v, 0)
    for step in range(100):  # past the first reallocation (30 + 64 tokens of room)
        k, v = _kv(new.layers[0].keys.shape[0], 1, step + 1)
        a = ref.update(k, v, 0)
        b = new.update(k, v, 0)
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
        if step in (10, 70):  # a row finishes and leaves the batch
            keep = torch.tensor([0, 2, 3][: new.layers[0].keys.shape[0] - 1])
            ref.batch_select_indices(keep)
            new.batch_select_indices(keep)
    assert new.get_seq_length() == ref.get_seq_length() == 130
    assert isinstance(new.layers[0], GrowingLayer)


def test_appending_a_token_writes_in_place_until_the_buffer_is_full():
    cache = growing_cache([_kv(2, 10, 0)])
    layer = cache.layers[0]
    buf = layer._k.data_ptr()
    for i in range(GrowingLayer.min_room):
        cache.update(*_kv(2, 1, i + 1), 0)
        assert layer._k.data_ptr() == buf  # no new allocation while there is room
    cache.update(*_kv(2, 1, 99), 0)
    assert layer._k.data_ptr() != buf and layer._k.shape[-2] >= 2 * (10 + GrowingLayer.min_room)
    assert cache.get_seq_length() == 10 + GrowingLayer.min_room + 1
