"""tiering/memory.py (and hot.py / warm.py): byte accounting, capacity, victims, staging."""

from __future__ import annotations

import pytest
import torch

from kvtier.tiering.errors import CapacityExceeded
from kvtier.tiering.hot import make_hot_tier, resolve_device
from kvtier.tiering.keys import BlockKey
from kvtier.tiering.memory import MemoryTier
from kvtier.tiering.policies import LRUPolicy
from kvtier.tiering.tier import Block
from kvtier.tiering.warm import make_warm_tier


def K(i: int) -> BlockKey:
    return BlockKey(i.to_bytes(16, "big"))


def B(n: int, fill: int = 1) -> Block:
    return Block(torch.full((n,), fill, dtype=torch.uint8), "uint8", (2, 1, 1, n // 2, 1), 0, b"n" * 16)


def test_accounting_and_capacity():
    t = MemoryTier("warm", "cpu", 100, LRUPolicy())
    t.put(K(1), B(40))
    t.put(K(2), B(40))
    assert t.used_bytes == 80 and t.free_bytes() == 20 and len(t) == 2
    with pytest.raises(CapacityExceeded):
        t.put(K(3), B(40))  # a tier never evicts on its own
    t.put(K(1), B(60))  # replacing: only the difference counts
    assert t.used_bytes == 100
    assert t.pop(K(1)).nbytes == 60 and t.used_bytes == 40
    assert t.pop(K(1)) is None and not t.delete(K(1))
    assert t.delete(K(2)) and t.used_bytes == 0 and len(t.policy) == 0


def test_get_touches_peek_does_not():
    t = MemoryTier("warm", "cpu", 100, LRUPolicy())
    for i in (1, 2, 3):
        t.put(K(i), B(10))
    t.peek(K(1))
    assert t.policy.order()[0] == K(1)
    assert t.get(K(1)) is not None and t.get(K(9)) is None
    assert t.policy.order()[-1] == K(1)
    assert t.contains(K(2)) and not t.contains(K(9))
    assert set(t.keys()) == {K(1), K(2), K(3)}


def test_victims_cover_the_shortfall_only():
    t = MemoryTier("warm", "cpu", 100, LRUPolicy())
    for i in (1, 2, 3):
        t.put(K(i), B(30))
    assert t.victims(10, lambda k: False) == []  # 10 free already
    assert t.victims(30, lambda k: False) == [K(1)]
    assert t.victims(30, lambda k: k == K(1)) == [K(2)]
    assert t.victims(101, lambda k: False) is None


def test_stage_copies_to_the_device():
    t = MemoryTier("hot", "cpu", 100, LRUPolicy())
    src = B(8, fill=3)
    staged = t.stage(src)
    assert staged.data.data_ptr() != src.data.data_ptr() and torch.equal(staged.data, src.data)
    src.data.fill_(0)
    assert int(staged.data[0]) == 3


def test_hot_and_warm_factories():
    assert resolve_device("off") is None
    assert resolve_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert resolve_device("auto") is None
        with pytest.raises(ValueError, match="auto"):
            resolve_device("cuda:0")
    assert make_hot_tier("cpu", 0, "lru") is None
    hot = make_hot_tier("cpu", 64, "s3fifo")
    assert hot.name == "hot" and hot.policy.name == "s3fifo"
    assert make_warm_tier(0, "lru") is None
    warm = make_warm_tier(64, "lru", pin="off")
    assert warm.name == "warm" and not warm.pin_memory
