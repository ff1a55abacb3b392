"""tiering/policies: tiny-key scenarios for LRU and S3-FIFO, and the contract both keep."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from kvtier.tiering.policies import LRUPolicy, S3FIFOPolicy, make_policy

ONE = lambda k: 1  # noqa: E731 - every key weighs one unit
NONE = lambda k: False  # noqa: E731 - nothing pinned


def filled(name: str, n: int):
    """Policy ``name`` with keys 0..n-1 inserted in order."""
    p = make_policy(name)
    for k in range(n):
        p.insert(k)
    return p


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_contract_victims_mutate_nothing(name):
    p = filled(name, 6)
    p.touch(3)
    before = p.order()
    assert p.victims(0, ONE, NONE) == []
    assert p.victims(2, ONE, NONE) == before[:2]
    assert p.victims(7, ONE, NONE) is None  # cannot free enough: None, nothing changed
    assert p.victims(3, ONE, lambda k: k in before[:2]) == before[2:5]  # pinned keys are skipped
    assert p.order() == before and len(p) == 6


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_contract_remove_and_unknown_keys(name):
    p = filled(name, 3)
    p.remove(1)
    p.remove(99)  # unknown: ignored
    p.touch(99)
    assert sorted(p.order()) == [0, 2] and len(p) == 2
    p.insert(0)  # re-insert of a present key is not a second entry
    assert sorted(p.order()) == [0, 2]


def test_make_policy_rejects_unknown():
    with pytest.raises(ValueError, match="lru"):
        make_policy("arc")


def test_lru_scenario():
    p = LRUPolicy()
    for k in (1, 2, 3, 4):
        p.insert(k)
    p.touch(1)  # 1 becomes most recent
    assert p.order() == [2, 3, 4, 1]
    p.insert(2)  # re-insert counts as use
    assert p.order() == [3, 4, 1, 2]
    assert p.victims(2, ONE, lambda k: k == 3) == [4, 1]


def test_s3fifo_one_hit_wonders_go_first():
    p = S3FIFOPolicy()
    for k in range(10):
        p.insert(k)
    p.touch(0)
    p.touch(0)
    p.touch(5)
    order = p.order()
    # Never-read keys leave the small queue in FIFO order; read keys (0, 5) are promoted to main.
    assert order[:7] == [1, 2, 3, 4, 6, 7, 8]
    assert order.index(0) > order.index(8) and order.index(5) > order.index(8)
    assert sorted(order) == list(range(10))


def test_s3fifo_scan_resistance():
    # A hot working set read once, then a long scan of one-off keys: the scan is evicted first.
    p = S3FIFOPolicy()
    for k in range(5):
        p.insert(k)
        p.touch(k)
    for k in range(100, 150):
        p.insert(k)
    victims = p.victims(45, ONE, NONE)
    assert not set(victims) & set(range(5))


def test_s3fifo_ghost_returns_to_main():
    p = S3FIFOPolicy(ghost_size=2)
    for k in range(5):
        p.insert(k)
    p.remove(0, evicted=True)  # never read, evicted from the small queue: remembered in the ghost queue
    assert 0 in p._ghost
    p.insert(0)  # quick return: straight into main
    assert 0 in p._main and 0 not in p._small and 0 not in p._ghost
    p.touch(1)
    p.remove(1, evicted=True)  # was read: not a one-hit wonder, not remembered
    assert 1 not in p._ghost
    p.remove(2)  # deleted, not evicted: nothing to remember
    assert 2 not in p._ghost
    for k in (3, 4):
        p.remove(k, evicted=True)
    assert list(p._ghost) == [3, 4]
    p.insert(5)
    p.remove(5, evicted=True)
    assert list(p._ghost) == [4, 5]  # bounded, oldest forgotten first
    p.remove(0, evicted=True)  # leaving main: no ghost
    assert 0 not in p._ghost and len(p) == 0 and p.order() == []


def test_s3fifo_commits_lazy_moves_on_eviction():
    """Keys read while waiting in the small queue really move to main when a victim behind them is
    evicted, and main's read keys really get their second chance (counter decremented)."""
    p = S3FIFOPolicy()
    for k in range(4):
        p.insert(k)  # all in the small queue
    p.touch(0)
    p.remove(1, evicted=True)  # the victim: 0 was passed over on the way, so 0 moved to main
    assert 0 in p._main and 0 not in p._small and p._freq[0] == 0
    for k in (10, 11):
        p.insert(k)
        p.remove(k, evicted=True)
        p.insert(k)  # via the ghost: into main, behind 0
    p.touch(10)
    p.remove(0, evicted=True)  # main's head: evicted (counter 0)
    p.remove(11, evicted=True)  # 10 was read and passed over: second chance, counter back to 0
    assert list(p._main) == [10] and p._freq[10] == 0


def test_s3fifo_main_second_chance():
    p = S3FIFOPolicy()
    for k in (1, 2, 3):
        p.insert(k)
        p.remove(k, evicted=True)
        p.insert(k)  # via the ghost: all three in main
    p.touch(1)
    assert p.order() == [2, 3, 1]  # 1 is read: reinserted at the tail with its counter decremented


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(["lru", "s3fifo"]),
       st.lists(st.tuples(st.sampled_from(["insert", "touch", "remove"]), st.integers(0, 9)), max_size=60))
def test_order_is_a_permutation_of_the_keys(name, ops):
    p = make_policy(name)
    live: set[int] = set()
    for op, k in ops:
        getattr(p, op)(k)
        if op == "insert":
            live.add(k)
        elif op == "remove":
            live.discard(k)
    order = p.order()
    assert sorted(order) == sorted(live) and len(order) == len(set(order)) == len(p)
    assert p.victims(len(live), ONE, NONE) == (order if live else [])


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_victims_walk_the_order_lazily(name):
    # an eviction needing two victims must not materialise the order of a large tier
    p = filled(name, 50_000)
    for k in range(0, 50_000, 7):
        p.touch(k)
    first = p.order()[:2]
    walked = 0
    real = p.iter_order

    def counting():
        nonlocal walked
        for key in real():
            walked += 1
            yield key

    p.iter_order = counting
    assert p.victims(2, ONE, NONE) == first
    assert walked <= 50  # O(victims) here, not O(keys)


def test_oldest_written_picks_in_write_order_skipping_pins():
    from kvtier.tiering.policies import OldestWrittenPolicy

    p = OldestWrittenPolicy()
    order = [1, 2, 3, 4]
    assert p.victims(0, order, ONE, NONE) == []
    assert p.victims(2, order, ONE, lambda k: k == 1) == [2, 3]
    assert p.victims(5, order, ONE, NONE) is None
