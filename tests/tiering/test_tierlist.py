"""tiering/tierlist.py: a tier plugged in BELOW cold (a stand-in for a remote tier: slow, can fail)
is consulted on a miss of every local tier, never written by puts, erased from, and a failure of it
is a miss. Adding it is one entry in the tier list: nothing else in the store changes."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch
from tiering_helpers import LAYOUT, NS, config, payload, tokens_for

from kvtier.tiering import TieredStore
from kvtier.tiering.checksum import checksum
from kvtier.tiering.errors import TierUnavailable
from kvtier.tiering.keys import BlockKey, chain_keys
from kvtier.tiering.memory import MemoryTier
from kvtier.tiering.policies import LRUPolicy
from kvtier.tiering.tier import Block
from kvtier.tiering.tierlist import TierList, build_tiers


class FlakyRemote(MemoryTier):
    """A slow tier below cold whose every call fails while ``down``."""

    slow = True
    usage_group = "remote"

    def __init__(self) -> None:
        super().__init__("remote", "cpu", 1 << 20, LRUPolicy())
        self.down = False

    def _up(self) -> None:
        if self.down:
            raise TierUnavailable("remote tier unreachable")

    def contains(self, key: BlockKey) -> bool:
        self._up()
        return super().contains(key)

    def get(self, key: BlockKey) -> Block | None:
        self._up()
        return super().get(key)

    def ns_of(self, key: BlockKey) -> bytes | None:
        self._up()
        return super().ns_of(key)

    def delete(self, key: BlockKey) -> bool:
        self._up()
        return super().delete(key)

    def keys(self):
        self._up()
        return super().keys()

    def block_count(self) -> int:
        self._up()
        return super().block_count()

    def ns_used_bytes(self, ns_ids) -> int:
        self._up()
        return super().ns_used_bytes(ns_ids)

    def check(self) -> list[str]:
        self._up()
        return super().check()


@pytest.fixture
def remote():
    return FlakyRemote()


@pytest.fixture
def store(data_dir, remote):
    def build(*a, **kw):
        t = build_tiers(*a, **kw)
        return TierList(t.caches, t.durable, [remote])  # the one entry a new tier needs

    with mock.patch("kvtier.tiering.store.build_tiers", side_effect=build):
        s = TieredStore(config(data_dir))
    yield s
    s.close()


def _seed(store: TieredStore, remote: FlakyRemote, seq: int, blocks: int = 2) -> list[BlockKey]:
    """Blocks of ``seq`` that only the remote tier holds (as another host would have written them)."""
    store.namespaces.register(NS)
    keys = chain_keys(NS, tokens_for(seq, blocks))
    for i, k in enumerate(keys):
        raw = np.frombuffer(payload(seq, i), dtype=np.uint8).copy()
        remote.put(k, Block(torch.from_numpy(raw), LAYOUT.dtype, LAYOUT.shape(), checksum(raw), NS.ns_id))
    return keys


def test_the_tier_list_is_caches_durable_below(store, remote):
    assert store.tier_names() == ["hot", "warm", "cold", "remote"] and store.tiers.below == [remote]
    assert store.memory == store.tiers.caches and set(store.usage()) == {"hot", "warm", "cold", "remote"}
    with pytest.raises(ValueError):
        TierList([remote])  # a cache must be fast: it is read under the store's lock


def test_a_miss_of_every_local_tier_is_served_from_below_and_promoted(store, remote):
    keys = _seed(store, remote, 1)
    assert [store.where(k) for k in keys] == ["remote", "remote"] and store.lookup(NS, tokens_for(1, 2)).blocks == 2
    block, tier = store.get(keys[0])
    assert tier == "remote" and block.data.numpy().tobytes() == payload(1, 0)
    assert store.where(keys[0]) == "hot" and store.stats.tiers["remote"].hits == 1
    assert [b is not None for _, b, _ in store.iter_blocks(keys)] == [True, True]
    assert store.owned(keys, NS.tenant) == [True, True] and store.check() == []


def test_puts_never_write_below_and_a_block_only_below_is_stored_locally(store, remote):
    keys = _seed(store, remote, 2)
    before = remote.block_count()
    result = store.put(NS, tokens_for(2, 2), [payload(2, i) for i in range(2)], durable=True)
    assert result.stored == keys and remote.block_count() == before  # local again, remote untouched
    store.put(NS, tokens_for(3, 1), [payload(3, 0)], durable=True)
    assert remote.block_count() == before and store.tenant_usage(NS.tenant)["remote"] > 0


def test_an_unavailable_tier_below_is_a_miss_not_an_error(store, remote):
    keys = _seed(store, remote, 4)
    remote.down = True
    assert store.get(keys[0]) is None and store.where(keys[0]) is None
    assert store.lookup(NS, tokens_for(4, 2)).blocks == 0 and store.owned(keys, NS.tenant) == [False, False]
    out = store.copy_out(keys, np.zeros(1 << 16, dtype=np.uint8))
    assert out.items == [] and out.stop == "miss"
    snap = store.snapshot()  # stats leave the failing tier out instead of failing
    assert "remote" not in snap["usage"] and store.tenant_usage(NS.tenant)["remote"] == 0
    assert store.check() == ["remote: unavailable"]
    with pytest.raises(TierUnavailable):  # an erase that cannot reach every tier must not look done
        store.loader.erase(keys)
    remote.down = False
    assert store.get(keys[0])[1] == "remote"


def test_copy_out_and_erase_reach_below(store, remote):
    keys = _seed(store, remote, 5)
    out = store.copy_out(keys, np.zeros(1 << 16, dtype=np.uint8))
    assert [t for _, _, t, _ in out.items] == ["remote", "remote"]
    store.put(NS, tokens_for(5, 2), [payload(5, i) for i in range(2)], session_id="s5")
    assert store.delete_session(NS.tenant, "s5", erase_blocks=True) == 2
    assert not any(remote.contains(k) for k in keys) and all(store.where(k) is None for k in keys)
    keys = _seed(store, remote, 6)
    assert store.invalidate(NS.tenant, namespace=NS) >= 2 and not any(remote.contains(k) for k in keys)
