"""An erase (delete_session with erase_blocks, invalidate) is never undone by a read that was already
running: tiering/tombstones.py alone, then the races it closes on a real store, forced with a gate."""

from __future__ import annotations

import threading
from unittest import mock

from tiering_helpers import NS, cold_of, payload, tokens_for

from kvtier.tiering.tombstones import Tombstones


def test_marks_refuse_older_reads_only_and_go_when_no_older_read_is_left():
    t = Tombstones()
    before = t.begin_read()
    t.begin_erase(["k"])
    during = t.begin_read()
    assert t.refuses(before, "k") and t.refuses(during, "k")  # a running erase refuses everyone
    assert not t.refuses(None, "k")  # a put is a new write, not a read putting something back
    assert not t.refuses(before, "other")
    t.end_erase(["k"])
    after = t.begin_read()
    assert t.refuses(before, "k") and t.refuses(during, "k") and not t.refuses(after, "k")
    t.end_read(before)
    t.end_read(during)
    assert len(t) == 0  # no read older than the mark is left
    t.end_read(after)


def test_overlapping_erases_of_one_name_keep_it_refused_until_the_last_ends():
    t = Tombstones()
    t.begin_erase(["k"])
    t.begin_erase(["k"])
    t.end_erase(["k"])
    late = t.begin_read()
    assert t.refuses(late, "k")  # the second erase still runs
    t.end_erase(["k"])
    assert not t.refuses(t.begin_read(), "k")
    t.end_read(late)


def _gated(target):
    """``target`` wrapped to stop at a gate once entered: ``(wrapper, entered, gate)``."""
    entered, gate = threading.Event(), threading.Event()

    def wrapper(*args, **kwargs):
        entered.set()
        assert gate.wait(10)
        return target(*args, **kwargs)

    return wrapper, entered, gate


def test_a_cold_load_running_during_an_erase_does_not_bring_the_block_back(make_store):
    s = make_store()
    keys = s.put(NS, tokens_for(1, 2), [payload(1, i) for i in range(2)], session_id="s1", durable=True).keys
    s.close()
    s = make_store()  # after a restart: everything is cold
    slow, entered, gate = _gated(cold_of(s).decode)
    with mock.patch.object(cold_of(s), "decode", side_effect=slow):
        got = []
        reader = threading.Thread(target=lambda: got.append(s.get(keys[0])))
        reader.start()
        assert entered.wait(10)  # the read holds the record, not yet decoded nor promoted
        assert s.delete_session(NS.tenant, "s1", erase_blocks=True) == 2
        gate.set()
        reader.join(10)
    assert got[0] is not None and got[0][0].data.numpy().tobytes() == payload(1, 0)  # it began before: answered
    assert s.where(keys[0]) is None and s.get(keys[0]) is None  # but the cache forgot it
    assert s.check() == []


def test_a_warm_hit_promoting_during_an_erase_does_not_bring_the_block_back(make_store):
    s = make_store()
    keys = s.put(NS, tokens_for(2, 6), [payload(2, i) for i in range(6)], session_id="s2").keys
    warm = next(k for k in keys if s.where(k) == "warm")  # the hot tier holds 4 blocks: the first went down
    slow, entered, gate = _gated(s.placement.place)
    with mock.patch.object(s.placement, "place", side_effect=slow):
        got = []
        reader = threading.Thread(target=lambda: got.append(s.get(warm)))
        reader.start()
        assert entered.wait(10)  # found in warm, about to be promoted to hot
        s.delete_session(NS.tenant, "s2", erase_blocks=True)
        gate.set()
        reader.join(10)
    assert got[0] is not None
    assert s.where(warm) is None


def test_an_invalidation_is_not_undone_by_a_running_load(make_store):
    s = make_store()
    keys = s.put(NS, tokens_for(3, 2), [payload(3, i) for i in range(2)], durable=True).keys
    s.close()
    s = make_store()
    slow, entered, gate = _gated(cold_of(s).decode)
    with mock.patch.object(cold_of(s), "decode", side_effect=slow):
        got = []
        reader = threading.Thread(target=lambda: got.append(s.get(keys[1])))
        reader.start()
        assert entered.wait(10)
        assert s.invalidate(NS.tenant, namespace=NS) == 2
        gate.set()
        reader.join(10)
    assert s.where(keys[1]) is None and s.lookup(NS, tokens_for(3, 2)).blocks == 0
    # a read that begins after the erase caches again (nothing is left to cache here): puts work as before
    assert s.put(NS, tokens_for(3, 2), [payload(3, i) for i in range(2)]).stored == keys
    assert s.get(keys[1]) is not None
