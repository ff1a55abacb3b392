"""tiering/store.py: one contract suite over every tier composition, then narrated scenarios.

Blocks are 64 bytes (see conftest); capacities read as "room for N blocks".
"""

from __future__ import annotations

import threading
import time
from unittest import mock

import numpy as np
import pytest
import torch

from kvtier.tiering import (CapacityExceeded, InvalidBlock, LayoutMismatch, Namespace, SessionNotFound, TierUnavailable,
                     TieredStore, chain_keys)
from kvtier.tiering.codec import Codec

from tiering_helpers import BLOCK, LAYOUT, NS, cold_of, config, payload, tokens_for

COMPOSITIONS = {
    "hot+warm+cold": {},
    "warm+cold": dict(hot_device="off"),
    "hot+cold": dict(warm_capacity=0),
    "cold-only": dict(hot_device="off", warm_capacity=0),
    "hot+warm": dict(cold_enabled=False),
    "warm-only": dict(hot_device="off", cold_enabled=False),
}


@pytest.fixture(params=[(c, p, w) for c in COMPOSITIONS for p in ("lru", "s3fifo")
                        for w in ("write_through", "write_back")],
                ids=lambda x: "-".join(x))
def any_store(request, make_store):
    comp, policy, wp = request.param
    return make_store(policy=policy, write_policy=wp, **COMPOSITIONS[comp])


def put1(store: TieredStore, seq: int, blocks: int = 1, **kw):
    toks = tokens_for(seq, blocks)
    return store.put(NS, toks, [payload(seq, i) for i in range(blocks)], **kw)


def data(got) -> bytes:
    return got[0].data.cpu().numpy().tobytes()


# -- contract: every composition -------------------------------------------------------------------
def test_contract_round_trip_and_miss(any_store):
    res = put1(any_store, 1, blocks=3)
    assert res.stored == res.keys and len(res.keys) == 3
    for i, k in enumerate(res.keys):
        got = any_store.get(k)
        assert data(got) == payload(1, i) and got[1] in any_store.tier_names()
    assert any_store.get(chain_keys(NS, tokens_for(2))[0]) is None
    assert any_store.check() == []


def test_contract_put_twice_skips(any_store):
    put1(any_store, 1, blocks=2)
    again = put1(any_store, 1, blocks=2)
    assert again.stored == [] and again.skipped_present == again.keys


def test_contract_lookup_moves_nothing(any_store):
    res = put1(any_store, 1, blocks=3)
    any_store.flush()
    before = any_store.snapshot()
    look = any_store.lookup(NS, tokens_for(1, 3) + [7, 7])  # 5th block missing → prefix of 3
    assert look.keys == res.keys and look.tokens == 12 and look.blocks == 3
    assert all(t in any_store.tier_names() for t in look.tiers)
    after = any_store.snapshot()
    assert after["tiers"] == before["tiers"] and after["bytes_moved"] == before["bytes_moved"]
    assert any_store.lookup(NS, keys=res.keys[1:]).blocks == 2


def test_contract_capacity_never_exceeded(any_store):
    for seq in range(30):
        put1(any_store, seq, blocks=2)
        any_store.get(chain_keys(NS, tokens_for(seq // 2, 2))[0])
    assert any_store.check() == []
    for name, u in any_store.usage().items():
        assert u["used_bytes"] <= u["capacity_bytes"], name


def test_contract_partial_last_block(any_store):
    toks = tokens_for(5, 2)[:6]  # one full block, one of 2 tokens
    res = any_store.put(NS, toks, [payload(5, 0), payload(5, 1, tokens=2)])
    got = any_store.get(res.keys[1])
    assert data(got) == payload(5, 1, tokens=2) and got[0].tokens == 2
    assert any_store.lookup(NS, toks).tokens == 6


def test_contract_sessions(any_store):
    put1(any_store, 1, blocks=2, session_id="s1")
    s = any_store.get_session("t", "s1")
    assert s.keys == chain_keys(NS, tokens_for(1, 2)) and s.tokens == 8 and s.namespace == NS
    assert [x.session_id for x in any_store.sessions()] == ["s1"]
    with pytest.raises(SessionNotFound):
        any_store.get_session("other-tenant", "s1")
    any_store.delete_session("t", "s1")
    with pytest.raises(SessionNotFound):
        any_store.get_session("t", "s1")
    assert any_store.get(s.keys[0]) is not None or cold_of(any_store) is None  # blocks stay (no erase)


def test_contract_erase(any_store):
    res = put1(any_store, 1, blocks=2, session_id="s1")
    assert any_store.delete_session("t", "s1", erase_blocks=True) == 2
    assert all(any_store.get(k) is None for k in res.keys)
    assert any_store.lookup(NS, tokens_for(1, 2)).blocks == 0


# -- validation ------------------------------------------------------------------------------------
def test_put_validation(make_store):
    s = make_store()
    with pytest.raises(InvalidBlock):
        s.put(NS, tokens_for(1), [b"short"])
    with pytest.raises(InvalidBlock):
        s.put(NS, tokens_for(1), [payload(1), payload(1)])  # more blocks than the tokens cover
    with pytest.raises(LayoutMismatch):
        s.put(NS, tokens_for(1), [torch.zeros(LAYOUT.shape(), dtype=torch.float32)])
    with pytest.raises(LayoutMismatch):
        s.put(NS, tokens_for(1), [torch.zeros((2, 1, 1, 3, 4), dtype=torch.float16)])
    assert s.put(NS, tokens_for(1, 2), [payload(1, 1)], first_block=1).stored == [chain_keys(NS, tokens_for(1, 2))[1]]


def test_put_tensor_and_numpy_payloads_are_copied(make_store):
    """The store must own its bytes: a caller reusing its buffer must not change stored blocks."""
    s = make_store()
    t = torch.arange(32, dtype=torch.float16).reshape(LAYOUT.shape())
    a = np.arange(32, dtype=np.float16).reshape(LAYOUT.shape()) + 100
    expect_t, expect_a = t.numpy().tobytes(), a.tobytes()
    kt = s.put(NS, tokens_for(1), [t]).keys[0]
    ka = s.put(NS, tokens_for(2), [a]).keys[0]
    t.fill_(0)
    a.fill(0)
    assert data(s.get(kt)) == expect_t and data(s.get(ka)) == expect_a


def test_admission_min_tokens(make_store):
    s = make_store(min_tokens=8)
    small = put1(s, 1, blocks=1, session_id="x")
    assert small.stored == [] and small.skipped_not_admitted == small.keys
    assert s.get(small.keys[0]) is None and s.stats.blocks_skipped_admission == 1
    assert put1(s, 2, blocks=2).stored


def test_durable_put_needs_cold(make_store):
    s = make_store(cold_enabled=False)
    with pytest.raises(TierUnavailable):
        put1(s, 1, durable=True)


def test_closed_store_raises(make_store):
    s = make_store()
    s.close()
    s.close()
    with pytest.raises(TierUnavailable, match="closed"):
        put1(s, 1)


# -- placement: demotion and promotion ---------------------------------------------------------------
@pytest.mark.parametrize("wp", ["write_through", "write_back"])
def test_demotion_hot_warm_cold(make_store, wp):
    s = make_store(hot_capacity=2 * BLOCK, warm_capacity=2 * BLOCK, write_policy=wp)
    keys = [put1(s, seq).keys[0] for seq in range(6)]  # 6 blocks: 2 hot, 2 warm, 2 only on disk
    s.flush()
    assert [s.where(k) for k in keys] == ["cold", "cold", "warm", "warm", "hot", "hot"]
    st = s.stats.tiers
    assert st["hot"].demotions == 4 and st["hot"].evictions == 0
    if wp == "write_back":  # copied into the cold writer's queue: demotions
        assert st["warm"].demotions == 2 and st["warm"].evictions == 0
    else:  # on disk already, dropped: evictions, not demotions
        assert st["warm"].demotions == 0 and st["warm"].evictions == 2
        assert "warm->cold" not in s.stats.bytes_moved
    assert s.usage()["cold"]["blocks"] == (6 if wp == "write_through" else 2)
    assert s.stats.bytes_moved["hot->warm"] == 4 * BLOCK
    if wp == "write_back":
        assert s.stats.bytes_moved["warm->cold"] == 2 * BLOCK
    for seq, k in enumerate(keys):
        assert data(s.get(k)) == payload(seq)
    assert s.check() == []


def test_promotion_on_lower_tier_hit(make_store):
    s = make_store(hot_capacity=2 * BLOCK, warm_capacity=2 * BLOCK)
    keys = [put1(s, seq).keys[0] for seq in range(6)]
    s.flush()
    got = s.get(keys[0])
    assert got[1] == "cold" and s.where(keys[0]) == "hot"
    assert s.stats.tiers["cold"].hits == 1 and s.stats.tiers["hot"].promotions == 1
    assert s.stats.bytes_moved["cold->hot"] == BLOCK
    # now hot [5, 0], warm [3, 4]: block 2 went to disk to make room for 4
    assert [s.where(k) for k in keys] == ["hot", "cold", "cold", "warm", "warm", "hot"]
    got = s.get(keys[3])
    assert got[1] == "warm" and s.where(keys[3]) == "hot"
    assert s.get(keys[3], promote=False)[1] == "hot"
    # Per-tier counters follow cache-level semantics: a warm hit is also a hot miss.
    assert s.stats.tiers["hot"].misses >= 2 and s.stats.tiers["warm"].hits == 1
    assert s.check() == []


def test_no_promote_leaves_tiers(make_store):
    s = make_store(hot_capacity=1 * BLOCK, warm_capacity=1 * BLOCK)
    keys = [put1(s, seq).keys[0] for seq in range(3)]
    s.flush()
    assert s.get(keys[0], promote=False)[1] == "cold" and s.where(keys[0]) == "cold"


def test_write_back_evicted_pending_block_stays_readable(make_store):
    """A block on its way to disk (demoted in write_back, not yet committed) is still served."""
    s = make_store(hot_capacity=BLOCK, warm_capacity=BLOCK, write_policy="write_back")
    gate = threading.Event()
    real = cold_of(s).write_batch
    with mock.patch.object(cold_of(s), "write_batch", side_effect=lambda *a, **kw: (gate.wait(5), real(*a, **kw))[1]):
        keys = [put1(s, seq).keys[0] for seq in range(4)]
        assert s.where(keys[0]) == "warm"  # pending
        assert data(s.get(keys[0], promote=False)) == payload(0)
        assert s.lookup(NS, tokens_for(0)).blocks == 1
        gate.set()
        s.flush()
    assert s.where(keys[0]) == "cold" and s.snapshot()["pending_writes"] == 0
    assert all(data(s.get(k)) == payload(i) for i, k in enumerate(keys))


def test_write_back_no_disk_traffic_while_it_fits(make_store):
    s = make_store(write_policy="write_back")
    put1(s, 1, blocks=2)
    s.flush()
    assert s.usage()["cold"]["blocks"] == 0
    put1(s, 2, durable=True)
    assert s.usage()["cold"]["blocks"] == 1


@pytest.mark.parametrize("wp", ["write_through", "write_back"])
def test_durable_put_of_a_block_already_in_memory_reaches_disk(make_store, wp):
    s = make_store(write_policy=wp)
    gate = threading.Event()
    real = cold_of(s).write_batch
    with mock.patch.object(cold_of(s), "write_batch", side_effect=lambda *a, **kw: (gate.wait(0.3), real(*a, **kw))[1]):
        k = put1(s, 1).keys[0]  # non-durable: in memory (and queued in write_through)
        res = put1(s, 1, durable=True)
        assert res.skipped_present == [k]
        assert cold_of(s).contains(k), "a durable put returned before its block was on disk"


def test_pinned_blocks_are_not_demoted(make_store):
    s = make_store(hot_capacity=2 * BLOCK, warm_capacity=0, cold_enabled=False)
    k0, k1 = put1(s, 0).keys[0], put1(s, 1).keys[0]
    lease = s.leases.acquire([k0, k1], 60)
    r = put1(s, 2)
    assert r.stored == r.keys and s.where(r.keys[0]) is None  # could not be placed: nowhere to go
    assert s.where(k0) == "hot" and s.where(k1) == "hot"
    s.leases.release(lease)
    put1(s, 3)
    assert s.where(k0) is None


# -- single flight, prefetch, iteration ------------------------------------------------------------
def test_single_flight_decodes_once(make_store):
    s = make_store(hot_capacity=BLOCK, warm_capacity=0, prefetch_threads=4)
    k = put1(s, 0).keys[0]
    put1(s, 1)
    s.flush()
    assert s.where(k) == "cold"
    real = Codec.decode
    started = threading.Event()
    calls = []

    def slow_decode(self, *a, **kw):
        calls.append(1)
        started.set()
        time.sleep(0.3)
        return real(self, *a, **kw)

    results = []
    with mock.patch.object(Codec, "decode", slow_decode):
        threads = [threading.Thread(target=lambda: results.append(s.get(k))) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(calls) == 1
    assert len(results) == 8 and all(r is not None and data(r) == payload(0) for r in results)


def test_prefetch_brings_blocks_up_and_pins(make_store):
    s = make_store(hot_capacity=4 * BLOCK, warm_capacity=0, lease_s=5)
    keys = put1(s, 0, blocks=3).keys
    for seq in range(1, 5):
        put1(s, seq)
    s.flush()
    assert [s.where(k) for k in keys] == ["cold"] * 3
    h = s.prefetch(keys)
    assert h.future.result(5) == 3
    assert [s.where(k) for k in keys] == ["hot"] * 3
    assert s.leases.is_pinned(keys[0]) and s.stats.prefetches == 1
    put1(s, 9)
    assert [s.where(k) for k in keys] == ["hot"] * 3  # pinned: others were demoted instead


def test_prefetch_deadline_stops(make_store):
    s = make_store(hot_capacity=16 * BLOCK, warm_capacity=0)
    keys = put1(s, 0, blocks=16).keys
    for seq in range(1, 17):
        put1(s, seq)
    s.flush()
    assert s.where(keys[-1]) == "cold"
    real = Codec.decode
    with mock.patch.object(Codec, "decode", lambda self, *a, **kw: (time.sleep(0.2), real(self, *a, **kw))[1]):
        h = s.prefetch(keys, deadline=time.monotonic() + 0.3)
        done = h.future.result(5)
    assert 1 <= done < 16


def test_prefetch_stops_at_first_miss(make_store):
    s = make_store()
    keys = put1(s, 0, blocks=3).keys
    assert s.prefetch([keys[0], chain_keys(NS, [9])[0], keys[1]]).future.result(5) == 1


def test_iter_blocks_yields_in_order_and_stops_at_miss(make_store):
    s = make_store()
    keys = put1(s, 0, blocks=3).keys
    missing = chain_keys(NS, [123])[0]
    out = list(s.iter_blocks(keys[:2] + [missing] + keys[2:]))
    assert [k for k, _, _ in out] == keys[:2] + [missing]
    assert out[-1][1] is None
    assert [b.data.numpy().tobytes() for _, b, _ in out[:2]] == [payload(0, 0), payload(0, 1)]
    assert s.leases.active() == 0


def test_iter_blocks_closed_early_releases_its_lease(make_store):
    s = make_store(lease_s=60)
    keys = put1(s, 0, blocks=3).keys
    it = s.iter_blocks(keys, window=2)
    next(it)
    assert s.leases.active() == 1
    it.close()
    assert s.leases.active() == 0
    it2 = s.iter_blocks(keys, deadline=time.monotonic() - 1)
    assert list(it2) == [] and s.leases.active() == 0


# -- invalidation, sessions, TTL --------------------------------------------------------------------
def test_invalidate_by_namespace_and_by_model(make_store):
    s = make_store()
    other_rev = Namespace("t", "m", "r2", LAYOUT)
    other_model = Namespace("t", "m2", "r", LAYOUT)
    k1 = put1(s, 1, session_id="a").keys[0]
    k2 = s.put(other_rev, tokens_for(2), [payload(2)], session_id="b").keys[0]
    k3 = s.put(other_model, tokens_for(3), [payload(3)]).keys[0]
    assert s.invalidate("t", namespace=NS) == 1  # one block, though held by hot and cold
    assert s.get(k1) is None and s.get(k2) is not None
    assert [x.session_id for x in s.sessions()] == ["b"]
    assert s.invalidate("t", model="m") == 1  # every revision of model m (r2 is left)
    assert s.get(k2) is None and s.get(k3) is not None and s.sessions() == []
    assert s.invalidate("someone-else", model="m2") == 0 and s.get(k3) is not None
    with pytest.raises(InvalidBlock):
        s.invalidate("t")


def test_session_ttl_expiry_erases_blocks(make_store):
    s = make_store(maintenance_s=3600)  # no sweeper: expire by hand
    res = put1(s, 1, session_id="old", ttl_s=0.05)
    keep = put1(s, 2, session_id="new", ttl_s=60)
    time.sleep(0.1)
    with pytest.raises(SessionNotFound):
        s.get_session("t", "old")
    assert s.expire_sessions() == 1
    assert [x.session_id for x in s.sessions()] == ["new"]
    assert s.get(res.keys[0]) is None and s.get(keep.keys[0]) is not None
    assert s.expire_sessions() == 0


def test_session_ttl_sweeper(make_store):
    s = make_store(maintenance_s=0.02, session_ttl_s=0.05)
    put1(s, 1, session_id="x")
    deadline = time.monotonic() + 5
    while s.sessions() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.sessions() == []


def test_resume_refreshes_and_prefetches(make_store):
    s = make_store(hot_capacity=BLOCK, warm_capacity=0)
    keys = put1(s, 1, blocks=2, session_id="s", ttl_s=60).keys
    s.flush()
    before = s.get_session("t", "s").last_used
    session, tiers, handle = s.resume("t", "s")
    assert session.keys == keys and tiers == ["cold", "hot"]
    assert handle.future.result(5) >= 1
    assert s.get_session("t", "s").last_used >= before


# -- data directory ------------------------------------------------------------------------------------
def test_data_dir_lock(make_store, data_dir):
    make_store()
    with pytest.raises(TierUnavailable, match="in use by another kvtier process"):
        TieredStore(config(data_dir))


def test_unusable_data_dir(tmp_dir):
    blocker = f"{tmp_dir}/a-file"
    open(blocker, "w").close()
    with pytest.raises(TierUnavailable, match="cannot use data directory"):
        TieredStore(config(blocker + "/sub"))


def test_failed_open_releases_the_dir_lock(data_dir):
    with mock.patch("kvtier.tiering.cold.ColdTier", side_effect=TierUnavailable("boom")):
        with pytest.raises(TierUnavailable):
            TieredStore(config(data_dir))
    TieredStore(config(data_dir)).close()  # the lock of the failed open is gone


def test_snapshot_and_check(make_store):
    s = make_store()
    put1(s, 1, blocks=2)
    s.flush()
    snap = s.snapshot()
    assert snap["puts"] == 1 and snap["blocks_stored"] == 2 and snap["usage"]["cold"]["blocks"] == 2
    assert snap["compression_ratio"] and snap["pending_writes"] == 0
    assert s.check() == []


def test_cold_full_of_pinned_blocks_durable_put_raises(make_store):
    s = make_store(hot_device="off", warm_capacity=0, cold_capacity=1 << 20, lease_s=60)
    cap = cold_of(s).capacity_bytes
    keys = []
    seq = 0
    while cold_of(s).used_bytes < cap - 4 * cold_of(s).footprint(200):
        keys += put1(s, seq, durable=True).keys
        seq += 1
    s.leases.acquire(keys, 60)
    with pytest.raises(CapacityExceeded):
        put1(s, seq, blocks=20, durable=True)  # more than the free room; every other block pinned
    assert all(cold_of(s).contains(k) for k in keys)
    assert s.snapshot()["write_errors"] == 1 and s.check() == []


def test_cold_full_evicts_oldest(make_store):
    s = make_store(hot_device="off", warm_capacity=0, cold_capacity=1 << 20)
    keys = [put1(s, seq, durable=True).keys[0] for seq in range(2000)]
    assert s.stats.tiers["cold"].evictions > 0
    assert s.get(keys[0]) is None and data(s.get(keys[-1])) == payload(1999)
    assert cold_of(s).used_bytes <= cold_of(s).capacity_bytes
