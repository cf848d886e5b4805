"""Cropping and multi-token steps on a non-empty cache (speculative verification, replay)."""

from __future__ import annotations

import pytest
import torch

from partition.kv_cache import CacheFullError, SegmentKVCache
from partition.segment import ModelSegment


@pytest.mark.parametrize("model_fixture", ["tiny_llama", "tiny_gpt2"])
def test_multi_token_step_after_prefix_equals_one_token_steps(model_fixture, request):
    source = request.getfixturevalue(model_fixture)
    # float64: this checks the cache and the multi-token mask, which are exact. In float32 a (1, T)
    # step and T (1, 1) steps run matmuls of other shapes that round differently; the GPT-2 test
    # model's logits reach ~35, where that rounding alone was 0.002 (6e-5 relative), past any
    # fixed tolerance that still means something. In float64 the two agree to the last float32 bit.
    seg = ModelSegment.load(source, 0, source.n_layers, dtype=torch.float64)
    ids = source.load_tokenizer()("a cache that grows and shrinks")["input_ids"]
    # One token at a time.
    c1 = seg.new_cache()
    step_logits = [seg(torch.tensor([[t]]), c1).logits[0, -1] for t in ids]
    # A prefix, then the rest in one multi-token step (needs the explicit mask).
    c2 = seg.new_cache()
    seg(torch.tensor([ids[:5]]), c2)
    multi = seg(torch.tensor([ids[5:]]), c2, logits="all").logits[0]
    single = torch.stack(step_logits[5:])
    torch.testing.assert_close(multi, single, rtol=1e-6, atol=1e-5)
    assert torch.equal(multi.argmax(-1), single.argmax(-1))


def test_crop_then_continue_equals_never_having_gone_further(tiny_llama):
    seg = ModelSegment.load(tiny_llama, 0, tiny_llama.n_layers)
    ids = tiny_llama.load_tokenizer()("rollback after a rejected draft")["input_ids"]
    clean = seg.new_cache()
    seg(torch.tensor([ids[:10]]), clean)
    expected = seg(torch.tensor([ids[10:12]]), clean, logits="all").logits

    rolled = seg.new_cache()
    seg(torch.tensor([ids]), rolled)  # went too far
    rolled.crop(10)
    assert rolled.length == 10
    got = seg(torch.tensor([ids[10:12]]), rolled, logits="all").logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cache_grows_past_its_first_allocation():
    cache = SegmentKVCache()
    k = torch.randn(1, 2, 300, 8)
    keys, _ = cache.update(k, k, layer_idx=3)
    torch.testing.assert_close(keys, k)
    more = torch.randn(1, 2, 300, 8)
    keys, _ = cache.update(more, more, layer_idx=3)
    torch.testing.assert_close(keys, torch.cat([k, more], dim=2))


def test_nbytes_follows_every_allocation_and_growth():
    def held(cache: SegmentKVCache) -> int:
        return sum(s.keys.nelement() * s.keys.element_size() * 2 for s in cache._layers.values())

    cache = SegmentKVCache()
    assert cache.nbytes() == 0
    for layer, t in ((0, 10), (1, 10), (0, 300), (1, 300), (0, 1)):
        kv = torch.randn(1, 2, t, 8)
        cache.update(kv, kv, layer_idx=layer)
        assert cache.nbytes() == held(cache) > 0
    cache.advance(311)
    cache.crop(5)
    assert cache.nbytes() == held(cache), "a crop keeps the storage"
    wide = cache.repeated(3)
    assert wide.nbytes() == held(wide) and wide.row(2).nbytes() == held(wide.row(2))


def test_cache_refuses_to_grow_past_its_limit():
    cache = SegmentKVCache(max_length_tokens=8)
    cache.update(torch.zeros(1, 1, 8, 4), torch.zeros(1, 1, 8, 4), layer_idx=0)
    with pytest.raises(CacheFullError):
        cache.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), layer_idx=0)
    with pytest.raises(ValueError):
        cache.crop(-1)
