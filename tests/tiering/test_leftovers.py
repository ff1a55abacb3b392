"""Issue 16 item 9 on the engine: priority-aware eviction, write-back blocks flushed on close and
surfaced on a writer failure. Real stores on a temporary data dir (64-byte blocks: see conftest)."""

from __future__ import annotations

import logging
from unittest import mock

import pytest

from kvtier.tiering import chain_keys

from tiering_helpers import BLOCK, NS, cold_of, payload, tokens_for


def data(got) -> bytes:
    return got[0].data.cpu().numpy().tobytes()


def test_blocks_of_a_higher_priority_session_are_evicted_last(make_store):
    s = make_store(hot_capacity=4 * BLOCK, warm_capacity=0)
    vip = s.put(NS, tokens_for(1, 2), [payload(1, i) for i in range(2)], session_id="vip", priority=5)
    low = s.put(NS, tokens_for(2, 2), [payload(2, i) for i in range(2)], session_id="low")
    s.put(NS, tokens_for(3, 2), [payload(3, i) for i in range(2)])  # hot is full: 2 victims
    assert [s.where(k) for k in vip.keys] == ["hot", "hot"]  # the oldest, but the highest priority
    assert [s.where(k) for k in low.keys] == ["cold", "cold"]
    assert s.check() == []
    s.close()
    s2 = make_store(hot_capacity=4 * BLOCK, warm_capacity=0)  # priorities come back with the sessions
    for k in vip.keys + low.keys:
        s2.get(k)  # all four in hot now, vip's first (least recent)
    s2.put(NS, tokens_for(4, 2), [payload(4, i) for i in range(2)])
    assert [s2.where(k) for k in vip.keys] == ["hot", "hot"]


def test_close_flushes_write_back_blocks_held_only_in_memory(make_store):
    s = make_store(write_policy="write_back")
    res = s.put(NS, tokens_for(1, 3), [payload(1, i) for i in range(3)], session_id="s")
    assert cold_of(s).block_count() == 0  # write-back: in memory only
    s.close()
    s2 = make_store(write_policy="write_back")
    assert s2.get_session("t", "s").keys == res.keys
    for i, k in enumerate(res.keys):
        got = s2.get(k)
        assert got is not None and data(got) == payload(1, i)


def test_a_failed_write_back_is_retried_then_counted_and_logged(make_store, caplog):
    s = make_store(write_policy="write_back", hot_capacity=2 * BLOCK, warm_capacity=0)
    caplog.set_level(logging.INFO, "kvtier.tiering.writer")
    with mock.patch.object(cold_of(s), "write_batch", side_effect=OSError("disk on fire")) as wb:
        for seq in range(4):  # two demotions from a full hot tier to the cold writer's queue
            s.put(NS, tokens_for(seq), [payload(seq)])
        s.flush()
    assert s.snapshot()["background_write_failures"] >= 2
    assert wb.call_count >= 2
    assert any(r.levelno == logging.WARNING and r.exc_info is None for r in caplog.records)
    assert s.get(chain_keys(NS, tokens_for(3))[0]) is not None  # what memory held stays served


def test_shed_frees_only_the_tenants_own_unpinned_blocks(make_store):
    from kvtier.tiering import Namespace

    from tiering_helpers import LAYOUT
    other = Namespace("u", "m", "r", LAYOUT)
    s = make_store(hot_capacity=8 * BLOCK, warm_capacity=0)
    mine = s.put(NS, tokens_for(1, 3), [payload(1, i) for i in range(3)]).keys
    theirs = s.put(other, tokens_for(2, 2), [payload(2, i) for i in range(2)]).keys
    lease = s.leases.acquire(mine[:1], 60)
    assert s.shed("t", 10 * BLOCK) == 2 * BLOCK  # the pinned one stays
    assert [s.where(k) for k in mine] == ["hot", "cold", "cold"] and [s.where(k) for k in theirs] == ["hot"] * 2
    s.leases.release(lease)
    assert s.tenant_usage("t")["memory"] == BLOCK and s.check() == []


@pytest.mark.parametrize("name", ["lru", "s3fifo"])
def test_priority_policy_takes_victims_lowest_priority_first(name):
    from kvtier.tiering.policies import Priorities, PriorityPolicy, make_policy
    table = Priorities()
    policy = PriorityPolicy(make_policy(name), table)
    for k in (5, 3, 4, 1, 0, 2):  # an inner order that no sort by key or hash reproduces
        policy.insert(k)
    table.raise_to([0, 1], 5)
    table.raise_to([2], 1)
    table.raise_to([0], 3)  # the highest priority naming a block wins
    order = policy.order()
    inner = policy.inner.order()
    # within one priority, exactly the wrapped policy's order (never a set's or a dict's hash order)
    assert order[:3] == [k for k in inner if k in {3, 4, 5}] and order[3] == 2
    assert order[4:] == [k for k in inner if k in {0, 1}] and table.of(0) == 5
    assert policy.victims(3, lambda k: 1, lambda k: k == 3) == [k for k in order if k != 3][:3]  # pinned 3 skipped
    table.raise_to([4, 5], -1)  # a negative priority goes first of all, still in the inner order
    assert policy.order()[:2] == [k for k in inner if k in {4, 5}] and len(policy) == 6
    table.forget([0, 1, 2, 4])
    assert policy.order() == policy.inner.order()
