"""Issue 16 on the engine: a write batch one bad record cannot sink, shared blocks that outlive a
session's TTL, one answer per key. Real stores on a temporary data dir; writes gated so that several
requests land in one batch."""

from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from unittest import mock

from kvtier.tiering import Namespace, SessionNotFound, chain_keys

from tiering_helpers import LAYOUT, NS, cold_of, payload, tokens_for

OTHER = Namespace("other-tenant", "m", "r", LAYOUT)
LONG = Namespace("L" * 256, "m", "r", LAYOUT)


@contextmanager
def one_batch(store):
    """Hold the cold writer on its first transaction (an empty flush job), so every job queued
    meanwhile is committed in the next batch, together."""
    cold = cold_of(store)
    real, gate, held = cold.write_batch, threading.Event(), threading.Event()

    def gated(*a, **kw):
        if not held.is_set():
            held.set()
            gate.wait(5)
        return real(*a, **kw)

    with mock.patch.object(cold, "write_batch", side_effect=gated):
        store.put(NS, tokens_for(99), [payload(99)])  # the first transaction: the writer waits in it
        assert held.wait(5)
        try:
            yield
        finally:
            gate.set()
            store.flush()


def data(got) -> bytes:
    return got[0].data.cpu().numpy().tobytes()


# -- item 2: a write batch isolates failures ------------------------------------------------------------
def test_one_unwritable_record_fails_only_its_own_request(make_store, caplog):
    s = make_store(writer_batch=64)
    caplog.set_level(logging.WARNING, "kvtier.tiering.writer")
    with one_batch(s):
        good = s.put(OTHER, tokens_for(1, 2), [payload(1, 0), payload(1, 1)], session_id="fine")
        # a 256-byte tenant + separator + a 256-byte id: over LMDB's 511-byte key limit (MDB_BAD_VALSIZE
        # at commit; the door refuses such ids now, the engine must still contain the failure)
        s.put(LONG, tokens_for(2), [payload(2)], session_id="x" * 256)
        also = s.put(NS, tokens_for(3), [payload(3)], session_id="also-fine")
    snap = s.snapshot()
    assert snap["background_write_failures"] == 1
    warned = [r for r in caplog.records if "failed" in r.getMessage()]
    assert warned and all(r.exc_info is None and "x" * 20 not in r.getMessage() for r in warned)
    assert s.get(chain_keys(LONG, tokens_for(2))[0]) is not None  # the failed put's block: still in memory
    s.close()
    s2 = make_store(writer_batch=64)
    assert s2.get_session("other-tenant", "fine").keys == good.keys
    assert s2.get_session("t", "also-fine").keys == also.keys
    for k, i in zip(good.keys, range(2)):
        assert data(s2.get(k)) == payload(1, i)
    assert data(s2.get(also.keys[0])) == payload(3)


# -- item 3: blocks shared by sessions outlive the TTL of one of them ---------------------------------------
def test_expiring_session_keeps_blocks_a_live_session_shares(make_store):
    s = make_store(maintenance_s=3600)  # the test runs the sweep itself
    toks = tokens_for(7, 3)
    durable = s.put(NS, toks, [payload(7, i) for i in range(3)], session_id="durable", durable=True)
    short = s.put(NS, toks[:8], [], session_id="short", ttl_s=0.01)  # shares the first two blocks
    extra = s.put(NS, toks[:8] + [1, 2, 3, 4], [payload(8)], first_block=2, session_id="short2", ttl_s=0.01)
    assert short.keys == durable.keys[:2]
    threading.Event().wait(0.05)
    assert s.expire_sessions() == 2
    for i, k in enumerate(durable.keys):
        assert data(s.get(k)) == payload(7, i)
    assert s.get(extra.keys[2]) is None  # the expired session's own block is gone
    s.close()
    s2 = make_store(maintenance_s=3600)
    assert s2.get_session("t", "durable").keys == durable.keys
    for i, k in enumerate(durable.keys):
        assert data(s2.get(k)) == payload(7, i)
    try:
        s2.get_session("t", "short")
        raise AssertionError("the expired session is still there")
    except SessionNotFound:
        pass


def test_delete_with_erase_blocks_erases_only_exclusive_blocks(make_store):
    s = make_store()
    toks = tokens_for(5, 3)
    a = s.put(NS, toks, [payload(5, i) for i in range(3)], session_id="a")
    s.put(NS, toks[:4], [], session_id="b")  # b names a's first block only
    assert s.delete_session("t", "a", erase_blocks=True) == 2
    assert data(s.get(a.keys[0])) == payload(5, 0)
    assert s.get(a.keys[1]) is None and s.get(a.keys[2]) is None
    assert s.get_session("t", "b").keys == a.keys[:1]


# -- item 5: one answer per key ---------------------------------------------------------------------------
def other_bytes(seq: int, i: int = 0) -> bytes:
    return bytes(255 - b for b in payload(seq, i))


def assert_one_answer(make_store, s, key, want: bytes) -> None:
    """``key`` reads ``want`` from memory, from cold once pushed out of memory, and after a restart."""
    assert data(s.get(key)) == want
    for seq in range(100, 114):  # 14 other blocks push it out of hot (4) and warm (8)
        s.put(NS, tokens_for(seq), [payload(seq)])
    s.flush()
    assert s.where(key) == "cold"
    assert data(s.get(key)) == want
    s.close()
    s2 = make_store()
    assert data(s2.get(key)) == want


def test_first_writer_wins_and_a_conflict_is_counted(make_store):
    s = make_store()
    first = s.put(NS, tokens_for(1), [payload(1)])
    second = s.put(NS, tokens_for(1), [other_bytes(1)])
    assert first.stored == first.keys and second.skipped_present == first.keys and not second.stored
    s.put(NS, tokens_for(1), [payload(1)])  # the same bytes again: no conflict
    assert s.snapshot()["put_conflicts"] == 1
    assert_one_answer(make_store, s, first.keys[0], payload(1))


def test_racing_writers_of_one_key_one_is_stored_one_answer_everywhere(make_store, monkeypatch):
    from kvtier.tiering.ingest import Ingest
    s = make_store()
    looked = threading.Barrier(2, timeout=5)
    real = Ingest._present

    def present_then_wait(self, keys):  # both writers look before either places: the race, forced
        found = real(self, keys)
        looked.wait()
        return found

    monkeypatch.setattr(Ingest, "_present", present_then_wait)
    results = {}

    def writer(name, body):
        results[name] = (s.put(NS, tokens_for(2), [body]), body)

    threads = [threading.Thread(target=writer, args=(n, b)) for n, b in (("a", payload(2)), ("b", other_bytes(2)))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    monkeypatch.setattr(Ingest, "_present", real)
    winners = [body for res, body in results.values() if res.stored]
    losers = [res for res, _ in results.values() if res.skipped_present and not res.stored]
    assert len(winners) == 1 and len(losers) == 1
    assert s.snapshot()["put_conflicts"] == 1
    assert_one_answer(make_store, s, chain_keys(NS, tokens_for(2))[0], winners[0])
