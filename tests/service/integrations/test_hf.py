"""kvtier.service.integrations.hf without a model: DynamicCache ↔ blocks, and save/restore over an in-process store
(and once over a real server's shared memory).

Caches are random tensors of SmolLM2's geometry; the end-to-end model test is
``tests/e2e/test_resume_smollm2.py``.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from transformers import DynamicCache

from kvtier.service.client import shm as shm_module
from kvtier.service.client.client import KVTierClient
from kvtier.service.integrations import hf
from kvtier.service.integrations.fingerprint import model_fingerprint
from kvtier.service.client.local import LocalKVTierClient
from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from kvtier.tiering.bytecopy import copy_many
from tests.fixtures.server import KVTierProcess

LAYOUT = BlockLayout("float32", 30, 3, 64, 16)
NS = Namespace("default", "test/hf", "r1", LAYOUT)


def random_cache(tokens: int, seed: int = 0) -> DynamicCache:
    gen = torch.Generator().manual_seed(seed)
    cache = DynamicCache()
    for i in range(LAYOUT.layers):
        cache.update(torch.randn(1, 3, tokens, 64, generator=gen), torch.randn(1, 3, tokens, 64, generator=gen), i)
    return cache


def same_cache(a: DynamicCache, b: DynamicCache, tokens: int) -> bool:
    return all(torch.equal(x.keys[..., :tokens, :], y.keys) and torch.equal(x.values[..., :tokens, :], y.values)
               for x, y in zip(a.layers, b.layers))


@pytest.fixture
def store(tmp_path):
    with TieredStore(StoreConfig(data_dir=str(tmp_path / "d"), hot_device="off", warm_capacity=256 << 20,
                                 durable_sync=False)) as s:
        yield s


def test_blocks_round_trip_with_a_partial_last_block():
    cache = random_cache(37)
    blocks = hf.cache_to_blocks(cache, LAYOUT)
    assert [b.shape[3] for b in blocks] == [16, 16, 5]
    assert all(b.is_contiguous() and b.dtype == torch.float32 and b.shape[:3] == (2, 30, 3) for b in blocks)
    assert same_cache(cache, hf.blocks_to_cache(blocks), 37)
    tail = hf.cache_to_blocks(cache, LAYOUT, 16, 30)
    assert len(tail) == 1 and torch.equal(tail[0], blocks[1][:, :, :, :14])
    half = hf.cache_to_blocks(cache, BlockLayout("float16", 30, 3, 64, 16))
    assert half[0].dtype == torch.float16


def test_cache_to_blocks_refuses_bad_ranges_and_layouts():
    cache = random_cache(20)
    with pytest.raises(ValueError):
        hf.cache_to_blocks(cache, LAYOUT, 8)  # not on a block boundary
    with pytest.raises(ValueError):
        hf.cache_to_blocks(cache, LAYOUT, 0, 21)
    with pytest.raises(ValueError):
        hf.cache_to_blocks(cache, BlockLayout("float32", 30, 4, 64, 16))


def test_save_sends_only_new_blocks_and_restore_leaves_a_token(store):
    ids = list(range(500, 540))
    cache = random_cache(40)
    first = hf.save_cache(store, NS, "c", ids[:32], cache)
    assert len(first.stored) == 2
    grown = hf.save_cache(store, NS, "c", ids, cache)
    assert len(grown.stored) == 1 and not grown.skipped_present  # blocks 0-1 were not sent again
    restored, n = hf.restore_cache(store, NS, ids)
    assert n == 39 and hf.cache_length(restored) == 39 and same_cache(cache, restored, 39)
    restored, n = hf.restore_cache(store, NS, ids + [1, 2, 3])
    assert n == 32  # the stored partial block (8 tokens) is not the full block of the longer prompt
    assert hf.restore_cache(store, NS, ids[:1]) == (None, 0)


def test_restore_by_session_reuses_its_partial_last_block(store):
    ids = list(range(700, 760))
    cache = random_cache(60)
    hf.save_cache(store, NS, "p", ids[:45], cache)  # 2 full blocks + a partial one of 13 tokens
    restored, n = hf.restore_cache(store, "p", ids, namespace=NS)
    assert n == 45 and same_cache(cache, restored, 45)
    assert hf.restore_cache(store, NS, ids)[1] == 32  # a namespace cannot know the partial block's length
    changed = ids[:40] + [1] + ids[41:]  # differs inside the partial block: only the full blocks are reused
    assert hf.restore_cache(store, "p", changed, namespace=NS)[1] == 32
    assert hf.restore_cache(store, "p", ids[:45], namespace=NS)[1] == 44  # the prompt ends with the session


def test_restore_by_session_checks_tokens_and_namespace(store):
    ids = list(range(48))
    cache = random_cache(48)
    kv = LocalKVTierClient(store)
    hf.save_cache(kv, NS, "s", ids, cache)
    restored, n = hf.restore_cache(kv, "s", ids + [9], namespace=NS)
    assert n == 48 and same_cache(cache, restored, 48)
    changed = list(ids)
    changed[20] += 1
    assert hf.restore_cache(kv, "s", changed, namespace=NS)[1] == 16  # stops at the changed block
    other = Namespace("default", "test/hf", "r2", LAYOUT)
    assert hf.restore_cache(kv, "s", ids, namespace=other) == (None, 0)
    assert hf.restore_cache(kv, other, ids) == (None, 0)


def test_fingerprint_is_cached_and_follows_the_file(tmp_path):
    f = tmp_path / "w.gguf"
    f.write_bytes(b"a" * 1000)
    first = model_fingerprint(weights_path=str(f), model_id="m")
    assert first == model_fingerprint(weights_path=str(f), model_id="m") and first.model == "m"
    f.write_bytes(b"b" * 1001)
    assert model_fingerprint(weights_path=str(f), model_id="m").revision != first.revision


def test_restore_takes_lossy_blocks_only_when_asked(tmp_path):
    lossy = Namespace("default", "test/hf", "r1", LAYOUT, cold_codec="int8")
    ids = list(range(900, 940))
    cache = random_cache(40)
    cfg = StoreConfig(data_dir=str(tmp_path / "d"), hot_device="off", warm_capacity=256 << 20, durable_sync=False)
    with TieredStore(cfg) as s:
        hf.save_cache(s, lossy, "l", ids, cache, durable=True)
        assert hf.restore_cache(s, lossy, ids)[1] == 39  # memory still holds the exact bytes
    with TieredStore(cfg) as s:  # reopened: every block comes back from its lossy cold record
        for target in (lossy, "l"):
            assert hf.restore_cache(s, target, ids, namespace=lossy) == (None, 0)
            restored, n = hf.restore_cache(s, target, ids, namespace=lossy, accept_lossy=True)
            assert n == 39 and not same_cache(cache, restored, 39)
            assert torch.allclose(restored.layers[0].keys, cache.layers[0].keys[..., :39, :], atol=0.1)


def test_cache_to_blocks_writes_into_out_and_checks_it():
    cache = random_cache(37)
    out = [torch.full(LAYOUT.shape(t), float("nan")) for t in (16, 16, 5)]
    blocks = hf.cache_to_blocks(cache, LAYOUT, out=out)
    assert all(b is o for b, o in zip(blocks, out))
    assert same_cache(cache, hf.blocks_to_cache(blocks), 37)
    with pytest.raises(ValueError):
        hf.cache_to_blocks(cache, LAYOUT, out=out[:2])
    with pytest.raises(ValueError):
        hf.cache_to_blocks(cache, LAYOUT, out=[o.half() for o in out])


def test_save_and_restore_over_shared_memory_are_token_exact(tmp_path):
    """save_cache converts the cache straight into the client's arena buffers (the Put names them, no
    second copy); the session comes back bit-exact, also after a second turn that sends only new blocks."""
    proc = KVTierProcess(tmp_path).start()
    try:
        ids = list(range(1000, 1075))
        cache = random_cache(75, seed=3)
        with KVTierClient(proc.target, data_path="shm") as kv:
            with mock.patch.object(shm_module, "copy_many", wraps=copy_many) as spy:
                first = hf.save_cache(kv, NS, "shm", ids[:40], cache)
                grown = hf.save_cache(kv, NS, "shm", ids, cache)
            assert sum(len(c.args[0]) for c in spy.call_args_list) == 0  # every block was named in place
            assert len(first.stored) == 3 and len(grown.stored) == 3  # 40 tokens, then blocks 2.. of 75
            restored, n = hf.restore_cache(kv, "shm", ids + [7], namespace=NS)
            assert n == 75 and same_cache(cache, restored, 75)
    finally:
        proc.kill()
