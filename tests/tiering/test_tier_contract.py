"""The Tier contract (tiering/tier.py), one suite run against every tier: hot (on cpu), warm, cold and
the write-behind tier over cold. A new tier joins by adding one entry to ``TIERS``."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from kvtier.tiering.checksum import checksum
from kvtier.tiering.codec import Codec
from kvtier.tiering.cold import ColdTier
from kvtier.tiering.errors import CapacityExceeded
from kvtier.tiering.hot import make_hot_tier
from kvtier.tiering.keys import BlockKey
from kvtier.tiering.tier import Block, Tier
from kvtier.tiering.warm import make_warm_tier
from kvtier.tiering.writebehind import WriteBehindTier

N = 4096  # bytes per test block: random, so records do not compress
NS_A, NS_B = b"a" * 16, b"b" * 16


def K(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "big"))


def B(i: int, ns: bytes = NS_A) -> Block:
    data = torch.randint(0, 256, (N,), dtype=torch.uint8, generator=torch.Generator().manual_seed(i))
    return Block(data, "uint8", (2, 1, 1, N // 2, 1), checksum(data.numpy()), ns)


def never(_key) -> bool:
    return False


def _cold(path: str) -> ColdTier:
    return ColdTier(os.path.join(path, "cold"), 1 << 20, Codec(), durable_sync=False)


TIERS = {
    "hot": lambda path: make_hot_tier("cpu", 24 * N, "lru"),
    "warm": lambda path: make_warm_tier(24 * N, "s3fifo", pin="off"),
    "cold": _cold,
    "writebehind": lambda path: WriteBehindTier(_cold(path), batch=4, threads=1, protected=never),
}
#: tiers whose put is asynchronous: a full tier makes room at commit (by its policy) instead of refusing
ASYNC = {"writebehind"}


@pytest.fixture(params=sorted(TIERS))
def tier(request, tmp_dir):
    t = TIERS[request.param](tmp_dir)
    t.kind = request.param
    yield t
    t.close()


def put(tier: Tier, i: int, ns: bytes = NS_A) -> Block:
    block = B(i, ns)
    tier.put(K(i), block)
    return block


def raw(tier: Tier, key: BlockKey) -> bytes:
    """The bytes ``fetch`` hands out, decoded into a buffer of our own when the tier decodes."""
    found = tier.fetch(key)
    if found.block is not None:
        return found.block.data.cpu().numpy().tobytes()
    out = np.empty(found.nbytes, dtype=np.uint8)
    assert found.decode_into(out) is not None
    return out.tobytes()


def fill(tier: Tier) -> list[BlockKey]:
    """Put blocks until one more would not fit (committed); returns the keys put, oldest first."""
    keys = []
    for i in range(1000):
        if tier.victims(N, never) != []:
            break
        try:
            put(tier, i)
            tier.flush()
        except CapacityExceeded:
            break
        if not tier.contains(K(i)):  # an asynchronous tier made room by its policy: full
            break
        keys.append(K(i))
    return keys


def test_a_miss_is_none_everywhere(tier):
    assert tier.get(K(1)) is None and tier.peek(K(1)) is None and tier.read(K(1)) is None
    assert tier.fetch(K(1)) is None and tier.ns_of(K(1)) is None
    assert not tier.contains(K(1)) and tier.contains_many([K(1), K(2)]) == [False, False]
    assert tier.locate([K(1)]) == [None] and not tier.delete(K(1)) and tier.delete_many([K(1)]) == []


def test_put_then_every_read_finds_the_same_block(tier):
    block = put(tier, 1)  # no flush: an asynchronous tier answers from its queue
    for got in (tier.get(K(1)), tier.peek(K(1)), tier.read(K(1))[0]):
        assert got.data.cpu().numpy().tobytes() == block.data.numpy().tobytes()
        assert (got.dtype, got.shape, got.checksum, got.ns_id) == (block.dtype, block.shape, block.checksum, NS_A)
    assert tier.read(K(1))[1] and tier.locate([K(1), K(2)])[0] is not None
    assert raw(tier, K(1)) == block.data.numpy().tobytes()
    assert tier.contains(K(1)) and tier.contains_many([K(2), K(1)]) == [False, True] and tier.ns_of(K(1)) == NS_A
    tier.flush()
    assert raw(tier, K(1)) == block.data.numpy().tobytes() and tier.check() == []


def test_put_replaces_and_delete_forgets(tier):
    put(tier, 1)
    tier.put(K(1), B(2))
    tier.flush()
    assert tier.get(K(1)).checksum == B(2).checksum and tier.block_count() == 1
    assert tier.delete(K(1)) and not tier.contains(K(1)) and not tier.delete(K(1))
    put(tier, 3)
    put(tier, 4)
    assert set(tier.delete_many([K(3), K(4), K(5)])) == {K(3), K(4)}
    tier.flush()
    assert tier.used_bytes == 0 and tier.block_count() == 0 and tier.check() == []


def test_keys_namespaces_and_accounting(tier):
    put(tier, 1, NS_A)
    put(tier, 2, NS_B)
    put(tier, 3, NS_B)
    tier.flush()
    assert set(tier.keys()) == {K(1), K(2), K(3)} and set(tier.keys_of_namespace(NS_B)) == {K(2), K(3)}
    assert 0 < tier.ns_used_bytes([NS_A]) < tier.ns_used_bytes([NS_B])
    assert tier.ns_used_bytes([NS_A, NS_B]) == tier.used_bytes <= tier.capacity_bytes
    assert tier.free_bytes() == tier.capacity_bytes - tier.used_bytes and tier.check() == []


def test_peeks_do_not_change_the_eviction_order(tier):
    keys = fill(tier)
    assert len(keys) > 3
    before = tier.victims(N, never)
    assert before  # full: a block more needs victims
    for k in keys:
        tier.contains(k)
        tier.peek(k)
        tier.ns_of(k)
    tier.contains_many(keys)
    tier.locate(keys)
    assert tier.victims(N, never) == before


def test_victims_are_transactional_then_evict_makes_room(tier):
    keys = fill(tier)
    used = tier.used_bytes
    victims = tier.victims(N, never)
    assert victims and set(victims) <= set(keys)
    assert tier.used_bytes == used and set(tier.keys()) == set(keys)  # choosing changed nothing
    assert tier.victims(N, never) == victims
    protected = set(victims[:1])
    other = tier.victims(N, lambda k: k in protected)
    assert other is not None and not protected & set(other)  # pins are never victims
    assert tier.victims(tier.capacity_bytes * 2, never) is None  # impossible: None, nothing changes
    assert tier.victims(N, lambda k: True) is None
    assert set(tier.keys()) == set(keys)
    removed = tier.evict(victims)
    assert [k for k, _ in removed] == victims and not any(tier.contains(k) for k in victims)
    assert tier.used_bytes < used and tier.victims(N, never) == [] and tier.check() == []


def test_a_full_tier_refuses_a_put_and_never_evicts_on_its_own(tier):
    if tier.kind in ASYNC:
        pytest.skip("an asynchronous tier makes room at commit, by its policy (tested in test_writebehind)")
    keys = fill(tier)
    with pytest.raises(CapacityExceeded):
        put(tier, 999)
    assert set(tier.keys()) == set(keys) and not tier.contains(K(999)) and tier.check() == []
