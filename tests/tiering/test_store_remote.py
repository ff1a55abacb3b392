"""Two stores (two hosts' engines, separate data dirs) sharing one real Redis Cluster as their remote tier.

Durable puts reach the cluster before they return, ``all`` feeds it from commits, sessions and blocks
parked on A are found on B (verified, promoted, counted), deletes reach the cluster, a down cluster
never costs a local hit, damaged or foreign remote values are misses.
"""

from __future__ import annotations

import threading
import time

import pytest
from remote_helpers import raw_client
from tiering_helpers import LAYOUT, NS, config, payload, tokens_for

from kvtier.tiering import Namespace, TieredStore
from kvtier.tiering.errors import SessionNotFound, TierUnavailable
from kvtier.tiering.keys import chain_keys
from kvtier.tiering.remote import RemoteConfig, records

BLOCKS = 6


def remote_config(cluster, **kw) -> RemoteConfig:
    base = dict(seeds=tuple(cluster.seeds), key_prefix="st:", ttl_s=600.0, base_timeout_s=0.5,
                breaker_failures=3, breaker_cooldown_s=0.5, write="durable")
    base.update(kw)
    return RemoteConfig(**base)


@pytest.fixture
def make_host(redis_cluster, tmp_path):
    opened: list[TieredStore] = []

    def make(name: str, **kw) -> TieredStore:
        remote = kw.pop("remote", None) or remote_config(redis_cluster, **kw.pop("remote_kw", {}))
        store = TieredStore(config(str(tmp_path / name), remote=remote, **kw))
        opened.append(store)
        return store

    yield make
    for s in opened:
        s.close()


def park(store: TieredStore, seq: int, sid: str, *, durable: bool = True, ns: Namespace = NS):
    toks = tokens_for(seq, BLOCKS)
    store.put(ns, toks, [payload(seq, i) for i in range(BLOCKS)], session_id=sid, durable=durable)
    return toks


def read_all(store: TieredStore, keys) -> list[tuple[bytes | None, str]]:
    return [(None if b is None else b.data.numpy().tobytes(), t) for _k, b, t in store.iter_blocks(keys)]


def test_a_durable_session_parked_on_a_resumes_on_b(make_host):
    a, b = make_host("a"), make_host("b")
    toks = park(a, 1, "chat")
    found = b.lookup(NS, toks)
    assert found.blocks == BLOCKS and set(found.tiers) == {"remote"}
    assert found.remote_tokens == len(toks) and found.local_tokens == 0
    session, tiers, handle = b.resume("t", "chat")
    assert session.tokens == len(toks) and tiers == ["remote"] * BLOCKS
    assert handle.future.result(10) == BLOCKS  # prefetched from the cluster into B's top tier
    got = read_all(b, session.keys)
    assert [g[0] for g in got] == [payload(1, i) for i in range(BLOCKS)]
    assert {t for _d, t in got} <= {"hot", "warm"}
    snap = b.snapshot()
    assert snap["tiers"]["remote"]["hits"] == BLOCKS and snap["shared"]["state"] == "closed"
    assert b.namespace_of(NS.ns_id) == NS  # the blocks pass the tenant checks on B
    assert b.lookup(NS, toks).local_tokens == len(toks)


def test_write_all_feeds_the_cluster_from_commits(make_host):
    a = make_host("a", remote_kw={"write": "all"})
    b = make_host("b", remote_kw={"write": "all"})
    toks = park(a, 2, "async", durable=False)
    a.flush()
    assert a.tiers.shared.remote.flush(10)
    session = b.get_session("t", "async")
    assert [d for d, _t in read_all(b, session.keys)] == [payload(2, i) for i in range(BLOCKS)]
    assert b.lookup(NS, toks).tokens == len(toks)


def test_write_durable_leaves_non_durable_puts_local(make_host):
    a, b = make_host("a"), make_host("b")
    toks = park(a, 3, "local", durable=False)
    a.flush()
    assert b.lookup(NS, toks).blocks == 0
    with pytest.raises(SessionNotFound):
        b.get_session("t", "local")


def test_the_newer_session_record_wins(make_host):
    a, b = make_host("a"), make_host("b")
    park(a, 4, "turns")
    longer = tokens_for(4, BLOCKS + 2)
    time.sleep(0.01)
    b.put(NS, longer, [payload(4, i) for i in range(BLOCKS + 2)], session_id="turns", durable=True)
    assert a.get_session("t", "turns").tokens == len(longer)  # B's later record beats A's own


def test_remote_down_local_serves_durable_fails_naming_remote(make_host, tmp_path):
    down = RemoteConfig(seeds=("127.0.0.1:1",), base_timeout_s=0.2, breaker_failures=1, breaker_cooldown_s=5.0)
    a = make_host("a", remote=down)
    toks = park(a, 5, "kept", durable=False)
    keys = a.get_session("t", "kept").keys
    assert [d for d, _t in read_all(a, keys)] == [payload(5, i) for i in range(BLOCKS)]
    with pytest.raises(TierUnavailable, match="remote tier"):
        park(a, 6, "needs-remote")
    session = a.get_session("t", "needs-remote")  # committed locally before the remote write failed
    assert [d for d, _t in read_all(a, session.keys)] == [payload(6, i) for i in range(BLOCKS)]
    assert a.lookup(NS, toks).tokens == len(toks)
    assert a.snapshot()["shared"]["state"] in ("open", "half-open")


@pytest.mark.parametrize("how", ["delete_session", "invalidate"])
def test_erases_reach_the_cluster(make_host, how):
    a, b = make_host("a"), make_host("b")
    ns = Namespace("t", f"m-{how}", "r", LAYOUT)
    toks = park(a, 7, how, ns=ns)
    if how == "delete_session":  # on B, which only knows the session from the cluster
        assert b.delete_session("t", how, erase_blocks=True) == BLOCKS
    else:
        assert a.invalidate("t", model=ns.model) == BLOCKS
    c = make_host("c")
    with pytest.raises(SessionNotFound):
        c.get_session("t", how)
    assert c.lookup(ns, toks).blocks == 0


def test_local_expiry_keeps_the_shared_copy(make_host):
    a = make_host("a")
    park(a, 9, "short")
    session = a.get_session("t", "short")
    assert a.loader.erase(session.keys, shared=False) == BLOCKS
    assert all(a.tiers.shared.contains_many(session.keys))


def test_damaged_remote_block_resumes_the_verified_prefix(make_host, redis_cluster):
    a, b = make_host("a"), make_host("b")
    park(a, 10, "torn")
    keys = a.get_session("t", "torn").keys
    client = raw_client(redis_cluster)
    try:
        name = records.block_base("st:", keys[3])
        value = bytearray(client.get(name))
        value[-1] ^= 0x40
        client.set(name, bytes(value), keepttl=True)
    finally:
        client.close()
    got = read_all(b, b.get_session("t", "torn").keys)
    assert [d for d, _t in got[:3]] == [payload(10, i) for i in range(3)] and got[3][0] is None
    assert b.snapshot()["tiers"]["remote"]["checksum_failures"] >= 1


def test_a_value_under_another_tenants_key_is_never_served(make_host, redis_cluster):
    a, b = make_host("a"), make_host("b")
    theirs = Namespace("mallory", "m", "r", LAYOUT)
    park(a, 11, "victim")
    mine = a.get_session("t", "victim").keys
    toks = tokens_for(11, BLOCKS)
    foreign = chain_keys(theirs, toks)
    client = raw_client(redis_cluster)
    try:  # copy every victim value under mallory's key names
        for k, f in zip(mine, foreign):
            client.set(records.block_base("st:", f), client.get(records.block_base("st:", k)))
    finally:
        client.close()
    assert b.lookup(theirs, toks).blocks == BLOCKS  # present (a hint)...
    assert read_all(b, foreign)[0][0] is None  # ...but never served: bound to the victim's key
    assert b.snapshot()["tiers"]["remote"]["checksum_failures"] >= 1


def test_a_remote_read_running_during_an_erase_does_not_put_the_block_back(make_host, monkeypatch):
    a, b = make_host("a"), make_host("b")
    park(a, 12, "race")
    key = b.get_session("t", "race").keys[0]
    shared = b.tiers.shared
    real = shared.read
    fetched, go = threading.Event(), threading.Event()

    def gated(k, ops=None):
        got = real(k, ops)  # the bytes come from the cluster...
        fetched.set()
        go.wait(10)  # ...and the erase runs before they are promoted
        return got

    monkeypatch.setattr(shared, "read", gated)
    out: dict = {}
    reader = threading.Thread(target=lambda: out.setdefault("got", b.get(key)))
    reader.start()
    assert fetched.wait(10)
    assert b.delete_session("t", "race", erase_blocks=True) == BLOCKS
    go.set()
    reader.join(10)
    assert out["got"] is not None  # it began before the erase: it answers its caller
    assert b.where(key) is None  # but nothing put the block back, here or in the cluster
