"""The remote tier on a real local Redis Cluster: round trips, damage → miss, TTLs, WAIT honesty, faults."""

from __future__ import annotations

import random
import threading
import time

import pytest
from fixtures.redis_cluster import free_port_pair
from remote_helpers import PART, key, node_of, part_names, raw_client, record_of, tier_config

from kvtier.tiering.crypto import RecordSealer
from kvtier.tiering.errors import TierUnavailable
from kvtier.tiering.remote import RemoteConfig, RemoteTier, RemoteWriteFailed, WriteOutcome
from kvtier.tiering.remote import records

# around one part (64 KiB, 44 of them the manifest's): full part 0, one byte over, two and three parts
SIZES = [1000, PART - 44, PART - 42, 2 * PART - 44, 2 * PART + 60, 3 * PART + 100]


@pytest.fixture
def make_tier(redis_cluster):
    made: list[RemoteTier] = []

    def make(**kw) -> RemoteTier:
        sealer = kw.pop("sealer", None)
        tier = RemoteTier(tier_config(redis_cluster, **kw), sealer=sealer)
        made.append(tier)
        return tier

    yield make
    for t in made:
        t.close()


@pytest.fixture
def raw(redis_cluster):
    client = raw_client(redis_cluster)
    yield client
    client.close()


def test_round_trip_around_the_part_size(make_tier, raw):
    tier = make_tier()
    items = [(key(i), record_of(size)) for i, size in enumerate(SIZES, 1)]
    result = tier.put_many(items, durable=True)
    assert result.all_durable
    got = tier.get_many([k for k, _ in items] + [key(999)])
    assert got == dict(items)  # byte-exact, and the absent key is a miss
    assert tier.contains_many([key(1), key(999)]) == [True, False]
    # the parts really are split at the configured size and share one slot
    names = part_names(key(6), records.parts_needed(3 * PART + 100, PART))
    assert len(names) == 4 and all(len(raw.get(n)) <= PART for n in names)
    assert len({raw.keyslot(n) for n in names}) == 1
    s = tier.stats()
    assert s["hits"] == len(SIZES) and s["misses"] == 1 and s["corrupt"] == 0 and s["state"] == "closed"


def test_every_key_has_a_ttl_refreshed_on_a_hit(make_tier, raw):
    tier = make_tier(ttl_s=600.0)
    tier.put_many([(key(1), record_of(2 * PART + 60))], durable=True)
    names = part_names(key(1), 3)
    assert all(0 < raw.pttl(n) <= 600_000 for n in names)
    for n in names:
        raw.pexpire(n, 5000)
    assert tier.get_many([key(1)])
    assert all(raw.pttl(n) > 500_000 for n in names)


@pytest.mark.parametrize("part", [0, 1, 2])
def test_a_flipped_byte_is_a_counted_miss(make_tier, raw, part):
    tier = make_tier()
    tier.put_many([(key(1), record_of(2 * PART + 60))], durable=True)
    name = part_names(key(1), 3)[part]
    value = bytearray(raw.get(name))
    value[len(value) // 2] ^= 0x01
    raw.set(name, bytes(value), keepttl=True)
    assert tier.get_many([key(1)]) == {}
    assert tier.stats()["corrupt"] == 1


def test_a_missing_part_is_a_miss(make_tier, raw):
    tier = make_tier()
    tier.put_many([(key(1), record_of(3 * PART + 100))], durable=True)
    raw.delete(part_names(key(1), 4)[2])
    assert tier.get_many([key(1)]) == {}
    assert tier.stats()["misses"] == 1


def test_a_torn_write_is_a_miss(make_tier, raw):
    tier = make_tier()
    old, new = record_of(2 * PART + 60), record_of(2 * PART + 60)
    tier.put_many([(key(1), old)], durable=True)
    # a new write that reached part 0 but not the others (connection lost mid-write)
    raw.set(part_names(key(1), 1)[0], records.split(key(1), new, PART)[0])
    assert tier.get_many([key(1)]) == {}
    # a part cut short
    tier.put_many([(key(2), new)], durable=True)
    name = part_names(key(2), 3)[1]
    raw.set(name, raw.get(name)[:100])
    assert tier.get_many([key(2)]) == {}
    # garbage where the manifest should be
    raw.set(part_names(key(2), 1)[0], b"garbage")
    assert tier.get_many([key(2)]) == {}
    assert tier.stats()["corrupt"] == 3


def test_a_record_under_another_key_is_never_served(make_tier, raw):
    tier = make_tier()
    record = record_of(2 * PART + 60)
    tier.put_many([(key(1), record)], durable=True)
    for src, dst in zip(part_names(key(1), 3), part_names(key(2), 3)):
        raw.set(dst, raw.get(src))  # copied verbatim under another (tenant's) key
    assert tier.get_many([key(2)]) == {}
    assert tier.get_many([key(1)]) == {key(1): record}


def test_with_a_sealer_a_consistent_but_foreign_record_is_a_miss(make_tier, raw):
    sealer = RecordSealer(bytes(range(32)))
    tier = make_tier(sealer=sealer)
    sealed = sealer.seal(key(1).digest, record_of(PART + 500))
    tier.put_many([(key(1), sealed)], durable=True)
    assert tier.get_many([key(1)]) == {key(1): sealed}
    # someone with write access re-files key 1's sealed record under key 2 with a matching manifest
    for name, value in zip(part_names(key(2), 2), records.split(key(2), sealed, PART)):
        raw.set(name, bytes(value))
    assert tier.get_many([key(2)]) == {}
    # and a tier without the key refuses sealed records instead of handing them out
    assert make_tier().get_many([key(1)]) == {}


def test_async_writes_arrive_and_are_counted(make_tier):
    tier = make_tier()
    items = [(key(i), record_of(size, seed=i)) for i, size in enumerate(SIZES * 3, 1)]
    result = tier.put_many(items, durable=False)
    assert set(result.outcomes.values()) == {WriteOutcome.QUEUED}
    assert tier.flush(20)
    assert tier.get_many([k for k, _ in items]) == dict(items)
    assert tier.stats()["writes_async"] == len(items)


def test_async_writes_are_retried_through_a_short_outage(make_tier, redis_cluster):
    tier = make_tier(breaker_failures=20, base_timeout_s=0.3, write_retries=6)
    items = [(key(i), record_of(PART + 2 * i, seed=i)) for i in range(1, 4)]
    master = node_of(redis_cluster, items[0][0])
    mine = [(k, r) for k, r in items if node_of(redis_cluster, k) == master] or items[:1]
    redis_cluster.pause(master)
    timer = threading.Timer(0.5, redis_cluster.resume, args=(master,))
    timer.start()
    try:
        tier.put_many(mine, durable=False)
        assert tier.flush(20)
    finally:
        timer.join()
    s = tier.stats()
    assert s["errors"] and s["dropped"] == 0, s  # it failed, then was retried until it landed
    assert tier.get_many([k for k, _ in mine]) == dict(mine), tier.stats()


def test_write_modes(make_tier):
    off, durable_only = make_tier(write="off"), make_tier(write="durable")
    assert off.put_many([(key(1), record_of(1000))], durable=True).outcomes[key(1)] is WriteOutcome.SKIPPED
    assert durable_only.put_many([(key(2), record_of(1000))], durable=False).outcomes[key(2)] is WriteOutcome.SKIPPED
    assert durable_only.get_many([key(1), key(2)]) == {}


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


def test_sessions_last_writer_wins_from_two_clients(make_tier):
    a, b = make_tier(), make_tier()
    sid = b"tenant\0conv-1"

    def writer(tier, versions):
        for v in versions:
            tier.put_session(sid, b"record-%d" % v * 50, v, durable=True)

    versions_a = list(range(1_700_000_000_000_000_000, 1_700_000_000_000_000_000 + 400, 2))
    versions_b = [v + 1 for v in versions_a]
    threads = [threading.Thread(target=writer, args=(a, versions_a)),
               threading.Thread(target=writer, args=(b, versions_b[::-1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    top = max(versions_b)
    assert a.get_session(sid) == (b"record-%d" % top * 50, top)  # the newest, whole
    assert a.put_session(sid, b"old", 5, durable=True) is WriteOutcome.STALE
    assert b.get_session(sid)[1] == top
    assert b.get_session(b"tenant\0other") is None
    assert a.delete_session(sid) and a.get_session(sid) is None


def test_delete_reaches_the_cluster(make_tier, raw):
    tier = make_tier()
    items = [(key(i), record_of(3 * PART + 100, seed=i)) for i in range(1, 6)]
    tier.put_many(items, durable=True)
    tier.put_many([(key(9), record_of(1000))], durable=False)  # maybe still queued
    assert tier.delete_many([k for k, _ in items] + [key(9)]) >= len(items)
    assert tier.flush(10)
    assert not any(raw.exists(n) for k, _ in items for n in part_names(k, 4))
    assert tier.get_many([k for k, _ in items] + [key(9)]) == {}


def test_spans_name_node_and_slot_never_keys(redis_cluster):
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tier = RemoteTier(tier_config(redis_cluster), tracer=provider.get_tracer("test"))
    try:
        tier.put_many([(key(1), record_of(1000))], durable=True)
        tier.get_many([key(1), key(2)])
    finally:
        tier.close()
    spans = exporter.get_finished_spans()
    names = {s.name for s in spans}
    assert {"kvtier.remote.read", "kvtier.remote.write"} <= names
    for s in spans:
        assert s.attributes["server.address"] == "127.0.0.1" and "kvtier.remote.slot" in s.attributes
        assert not any(key(1).hex() in str(v) or key(2).hex() in str(v) for v in s.attributes.values())


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


def test_threads_share_one_tier(make_tier):
    tier = make_tier()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(10):
                k, rec = key(1000 * t + i), record_of(PART + 2 * i + 2 * t, seed=t * 100 + i)
                assert tier.put_many([(k, rec)], durable=True).all_durable
                assert tier.get_many([k]) == {k: rec}
                tier.put_many([(key(5000 + 1000 * t + i), rec)], durable=False)
        except BaseException as exc:  # noqa: BLE001 (reported below)
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert tier.flush(20)
    assert len(tier.get_many([key(5000 + 1000 * t + i) for t in range(4) for i in range(10)])) == 40
