"""tiering/placement.py: insert, demote, promote over the caches, narrated with 64-byte blocks."""

from __future__ import annotations

import threading

import torch

from kvtier.tiering.keys import BlockKey
from kvtier.tiering.leases import LeaseTable
from kvtier.tiering.memory import MemoryTier
from kvtier.tiering.placement import Placement
from kvtier.tiering.policies import LRUPolicy
from kvtier.tiering.stats import StoreStats
from kvtier.tiering.tier import Block
from kvtier.tiering.tierlist import TierList
from kvtier.tiering.tombstones import Tombstones

N = 64


def K(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "big"))


def B(i: int) -> Block:
    return Block(torch.full((N,), i % 256, dtype=torch.uint8), "uint8", (2, 1, 1, N // 2, 1), i, b"n" * 16)


def make(durable=None, *, write_back=False) -> tuple[Placement, MemoryTier, MemoryTier, StoreStats, LeaseTable]:
    hot = MemoryTier("hot", "cpu", 2 * N, LRUPolicy())
    warm = MemoryTier("warm", "cpu", 3 * N, LRUPolicy())
    stats, leases = StoreStats(), LeaseTable()
    p = Placement(TierList([hot, warm], durable), lock=threading.RLock(), leases=leases, stats=stats,
                  tombstones=Tombstones(), write_back=write_back)
    return p, hot, warm, stats, leases


def test_inserts_fill_hot_then_demote_down_and_drop_out_of_the_last_cache():
    p, hot, warm, stats, _ = make()
    for i in range(1, 6):
        assert p.place(K(i), B(i)) == 0
    assert set(hot.keys()) == {K(4), K(5)} and set(warm.keys()) == {K(1), K(2), K(3)}
    assert p.place(K(6), B(6)) == 0  # 4 goes to warm, whose oldest (1) drops out (write-through)
    assert set(warm.keys()) == {K(2), K(3), K(4)} and stats.tiers["warm"].evictions == 1
    assert stats.tiers["warm"].demotions == 0  # dropped, not copied below: an eviction only
    assert stats.tiers["hot"].demotions == 4 and stats.bytes_moved["hot->warm"] == 4 * N
    assert hot.check() == [] and warm.check() == []


def test_pinned_blocks_are_never_victims():
    p, hot, warm, _, leases = make()
    p.place(K(1), B(1))
    p.place(K(2), B(2))
    leases.acquire([K(1), K(2)], 60)
    assert p.place(K(3), B(3)) == 1  # hot is all pinned: the block lands in warm
    assert set(hot.keys()) == {K(1), K(2)} and warm.contains(K(3))


def test_promote_moves_a_block_up_and_counts_it():
    p, hot, warm, stats, _ = make()
    assert p.place(K(1), B(1), start=1) == 1
    got = p.promote(K(1), warm.peek(K(1)), "warm")
    assert hot.contains(K(1)) and got is hot.peek(K(1)) and stats.tiers["hot"].promotions == 1
    assert stats.bytes_moved["warm->hot"] == N


def test_a_read_never_puts_back_a_block_erased_since_it_began():
    p, hot, _, _, _ = make()
    since = p.tombstones.begin_read()
    p.tombstones.begin_erase([K(1)])
    assert p.place(K(1), B(1), since=since) == -1 and not hot.contains(K(1))


def test_write_back_queues_the_last_caches_victims_for_the_durable_tier(durable):
    p, hot, warm, stats, _ = make(durable, write_back=True)
    for i in range(1, 7):
        p.place(K(i), B(i))
    durable.flush()
    assert durable.contains(K(1)) and not warm.contains(K(1)) and stats.bytes_moved["warm->cold"] == N
    assert p.held_only_in_caches([K(1), K(6)]) == [(K(6), hot.peek(K(6)))]
