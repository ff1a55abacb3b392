"""The remote tier on a real local Redis Cluster: round trips, damage → miss, TTLs, writes, sessions, spans.

Faults (paused/killed nodes, failover, reshard, memory limits, an unreachable cluster): ``test_remote_faults``.
"""

from __future__ import annotations

import threading

import pytest
from remote_helpers import PART, key, make_tier, part_names, raw, record_of, tier_config  # noqa: F401 (fixtures)

from kvtier.tiering.crypto import RecordSealer
from kvtier.tiering.remote import RemoteTier, WriteOutcome
from kvtier.tiering.remote import records

# around one part (64 KiB, 44 of them the manifest's): full part 0, one byte over, two and three parts
SIZES = [1000, PART - 44, PART - 42, 2 * PART - 44, 2 * PART + 60, 3 * PART + 100]


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


def test_write_modes(make_tier):
    off, durable_only = make_tier(write="off"), make_tier(write="durable")
    assert off.put_many([(key(1), record_of(1000))], durable=True).outcomes[key(1)] is WriteOutcome.SKIPPED
    assert durable_only.put_many([(key(2), record_of(1000))], durable=False).outcomes[key(2)] is WriteOutcome.SKIPPED
    assert durable_only.get_many([key(1), key(2)]) == {}


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
    # queued (not durable): written by the writer thread after the blocks queued before it
    queued_sid = b"tenant\0conv-2"
    a.put_many([(key(1), record_of(1000))], durable=False)
    assert a.put_session(queued_sid, b"{}", 10) is WriteOutcome.QUEUED
    assert a.flush(10)
    assert b.get_session(queued_sid) == (b"{}", 10) and b.get_many([key(1)])


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

