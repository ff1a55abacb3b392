"""The remote tier under faults on a real local Redis Cluster: WAIT honesty, paused and killed nodes, failover,
slot migration, the whole cluster down, tiny maxmemory, a short outage under async writes."""

from __future__ import annotations

import random
import threading
import time

import pytest
from fixtures.redis_cluster import free_port_pair
from remote_helpers import PART, key, make_tier, node_of, raw_client, record_of  # noqa: F401 (fixture)

from kvtier.tiering.errors import TierUnavailable
from kvtier.tiering.remote import RemoteConfig, RemoteTier, RemoteWriteFailed, WriteOutcome
from kvtier.tiering.remote import records


def test_async_writes_are_retried_through_a_short_outage(make_tier, redis_cluster):
    tier = make_tier(breaker_failures=20, base_timeout_s=0.3, write_retries=6)
    items = [(key(i), record_of(PART + 2 * i, seed=i)) for i in range(1, 4)]
    master = node_of(redis_cluster, items[0][0])
    mine = [(k, r) for k, r in items if node_of(redis_cluster, k) == master] or items[:1]
    redis_cluster.pause(master)

    def resume_after_a_failure() -> None:  # not on a timer: a loaded machine may start the write late
        end = time.monotonic() + 10
        while not tier.stats()["errors"] and time.monotonic() < end:
            time.sleep(0.02)
        redis_cluster.resume(master)

    timer = threading.Thread(target=resume_after_a_failure)
    timer.start()
    try:
        tier.put_many(mine, durable=False)
        assert tier.flush(20)
    finally:
        timer.join()
    s = tier.stats()
    assert s["errors"] and s["dropped"] == 0, s  # it failed, then was retried until it landed
    assert tier.get_many([k for k, _ in mine]) == dict(mine), tier.stats()


def test_wait_is_honest_when_the_replica_is_paused(make_tier, redis_cluster):
    tier = make_tier(min_replicas=1)
    k = key(7)
    master = node_of(redis_cluster, k)
    replica = redis_cluster.replicas_of(master)[0]
    redis_cluster.pause(replica)
    try:
        with pytest.raises(RemoteWriteFailed) as info:
            tier.put_many([(k, record_of(PART + 500))], durable=True)
        assert isinstance(info.value, TierUnavailable)
        assert info.value.result.outcomes[k] is WriteOutcome.WRITTEN  # on the primary, not durable
        sid = next(s for s in (b"t\0s%d" % i for i in range(1000))
                   if redis_cluster.master_of_key(records.session_name("t:", s)) == master)
        with pytest.raises(RemoteWriteFailed):
            tier.put_session(sid, b"{}", 1, durable=True)
    finally:
        redis_cluster.resume(replica)
    assert tier.stats()["writes_not_durable"] >= 1


def test_a_paused_master_makes_a_miss_not_a_hang(make_tier, redis_cluster):
    tier = make_tier(base_timeout_s=0.3)
    record = record_of(PART + 500)
    tier.put_many([(key(1), record)], durable=True)
    master = node_of(redis_cluster, key(1))
    redis_cluster.pause(master)
    try:
        assert tier.get_many([key(1)]) == {}  # bounded by the read's deadline (pytest-timeout guards a hang)
        assert tier.contains_many([key(1)]) == [False]
    finally:
        redis_cluster.resume(master)
    assert tier.stats()["errors"].get("timeout", 0) >= 1
    assert tier.get_many([key(1)]) == {key(1): record}


def test_failover_loses_no_acknowledged_record(make_tier, redis_cluster):
    tier = make_tier()
    items = [(key(i), record_of(PART + 2 * i, seed=i)) for i in range(1, 25)]
    assert tier.put_many(items, durable=True).all_durable
    victim = items[0][0]
    master = node_of(redis_cluster, victim)
    redis_cluster.kill(master)
    # while the shard fails over: its blocks are misses, never errors or wrong bytes
    got = tier.get_many([k for k, _ in items])
    assert all(got[k] == r for k, r in items if k in got) and victim not in got
    redis_cluster.wait_failover(master, raw_client(redis_cluster).keyslot(records.block_base("t:", victim)))
    deadline = time.monotonic() + 20
    got = {}
    while time.monotonic() < deadline and len(got) < len(items):
        got = tier.get_many([k for k, _ in items])
        time.sleep(0.2)
    assert got == dict(items)
    # the promoted replica has no replica of its own yet: a durable write there is refused, honestly
    with pytest.raises(RemoteWriteFailed):
        tier.put_many([(victim, record_of(1000))], durable=True)
    redis_cluster.heal()
    deadline = time.monotonic() + 20
    while True:
        try:
            assert tier.put_many([(victim, record_of(1000))], durable=True).all_durable
            break
        except RemoteWriteFailed:
            assert time.monotonic() < deadline
            time.sleep(0.3)


def test_slot_migration_under_traffic_loses_no_acknowledged_write(make_tier, redis_cluster):
    """``redis-cli --cluster reshard`` moves slots (MOVED/ASK/TRYAGAIN) while blocks are written and read."""
    tier = make_tier()
    src, dst = redis_cluster.masters_now()[:2]
    lo = min(a for a, _, ports in redis_cluster.slot_ranges() if ports[0] == src)
    slot = raw_client(redis_cluster).keyslot
    keys = [k for k in (key(i) for i in range(1, 20000)) if lo <= slot(records.block_base("t:", k)) < lo + 400][:40]
    acked: dict = {}
    first = [(k, record_of(5 * PART, seed=i)) for i, k in enumerate(keys[:20], 1)]
    assert tier.put_many(first, durable=True).all_durable
    acked.update(first)
    mover = threading.Thread(target=redis_cluster.reshard, args=(src, dst, 400))
    mover.start()
    pending = [(k, record_of(5 * PART, seed=i)) for i, k in enumerate(keys[20:], 100)]
    while mover.is_alive() or pending:
        if pending:
            item = pending.pop()
            try:
                tier.put_many([item], durable=True)
                acked[item[0]] = item[1]
            except RemoteWriteFailed:
                pass  # refused honestly during the move; never acknowledged
        got = tier.get_many(list(acked))
        assert all(got[k] == acked[k] for k in got)
    mover.join(120)
    assert redis_cluster.master_of_slot(lo) == dst
    deadline = time.monotonic() + 20
    while (got := tier.get_many(list(acked))) != acked:
        assert time.monotonic() < deadline, f"{len(acked) - len(got)} acknowledged blocks lost"
        time.sleep(0.2)
    assert len(acked) >= 20


def test_cluster_down_reads_miss_fast_breaker_opens_then_closes(make_tier, redis_cluster):
    tier = make_tier(breaker_failures=3, breaker_cooldown_s=0.5)
    record = record_of(PART + 500)
    tier.put_many([(key(1), record)], durable=True)
    time.sleep(1.2)  # appendfsync everysec: on disk before the kill
    for node in redis_cluster.nodes:
        redis_cluster.kill(node.port)
    for _ in range(6):
        assert tier.get_many([key(1)]) == {}
    s = tier.stats()
    assert s["state"] == "open" and s["short_circuited"] >= 1 and s["errors"]
    with pytest.raises(RemoteWriteFailed):
        tier.put_many([(key(2), record)], durable=True)
    assert tier.put_many([(key(3), record)], durable=False).outcomes[key(3)] is WriteOutcome.QUEUED
    redis_cluster.heal()
    deadline = time.monotonic() + 20
    while tier.get_many([key(1)]) != {key(1): record}:
        assert time.monotonic() < deadline, tier.stats()
        time.sleep(0.3)
    assert tier.stats()["state"] == "closed"


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru"])
def test_tiny_maxmemory_drops_writes_and_serves_only_exact_bytes(make_tier, redis_cluster, policy):
    tier = make_tier()
    for port in redis_cluster.masters_now():
        used = redis_cluster.node(port).admin().info("memory")["used_memory"]
        redis_cluster.config_set("maxmemory-policy", policy, [port])
        redis_cluster.config_set("maxmemory", used + 512 * 1024, [port])
    items = [(key(i), record_of(2 * PART + 60, seed=i)) for i in range(1, 41)]
    try:
        tier.put_many(items[:4], durable=True)
    except RemoteWriteFailed as exc:  # noeviction: out of memory is reported, not raised raw
        assert WriteOutcome.DROPPED in exc.result.outcomes.values()
    tier.put_many(items[4:], durable=False)
    assert tier.flush(30)
    got = tier.get_many([k for k, _ in items])
    assert all(got[k] == r for k, r in items if k in got)
    s = tier.stats()
    assert len(got) < len(items)
    if policy == "noeviction":
        assert s["errors"].get("oom", 0) > 0 and s["dropped"] > 0
    else:
        evicted = sum(redis_cluster.node(p).admin().info("stats")["evicted_keys"] for p in redis_cluster.masters_now())
        assert evicted > 0


def test_a_tier_started_while_the_cluster_is_unreachable_serves_misses_and_refuses_durable_writes():
    port = free_port_pair(random.Random())
    tier = RemoteTier(RemoteConfig(seeds=(f"127.0.0.1:{port}",), base_timeout_s=0.2, breaker_failures=2,
                                   write="all"))
    try:
        assert tier.get_many([key(1)]) == {} and tier.contains_many([key(1)]) == [False]
        assert tier.get_session(b"t\0x") is None
        with pytest.raises(TierUnavailable):
            tier.put_many([(key(1), record_of(1000))], durable=True)
        assert tier.put_many([(key(2), record_of(1000))], durable=False).outcomes[key(2)] is WriteOutcome.QUEUED
        assert tier.flush(10)
        s = tier.stats()
        assert s["errors"] and s["dropped"] >= 1
    finally:
        tier.close()
