"""tiering/loader.py: single-flight loads from slow tiers, the one read-ahead window, erases."""

from __future__ import annotations

import threading
import time
from unittest import mock

from tiering_helpers import NS, cold_of, payload, tokens_for


def test_concurrent_reads_of_a_cold_block_load_it_once(make_store):
    s = make_store()
    keys = s.put(NS, tokens_for(1, 1), [payload(1, 0)], durable=True).keys
    s.close()
    s = make_store()
    cold = cold_of(s)
    entered, gate, calls = threading.Event(), threading.Event(), []
    real = cold.read

    def slow(*a, **kw):
        calls.append(1)
        entered.set()
        gate.wait(5)
        return real(*a, **kw)

    with mock.patch.object(cold, "read", side_effect=slow):
        got = []
        readers = [threading.Thread(target=lambda: got.append(s.loader.get(keys[0], promote=False)))
                   for _ in range(4)]
        for r in readers:
            r.start()
        assert entered.wait(5)
        while s.loader.inflight() != 1:
            time.sleep(0.01)
        gate.set()
        for r in readers:
            r.join(5)
    assert len(calls) == 1 and len(got) == 4 and all(g is not None and g[1] == "cold" for g in got)
    assert s.loader.inflight() == 0


def test_read_ahead_yields_in_order_keeps_a_window_and_stops_when_told(make_store):
    s = make_store()
    started = []
    lock = threading.Lock()

    def load(k):
        with lock:
            started.append(k)
        return k * 10

    out = list(s.loader.read_ahead(list(range(6)), load, window=3, inline=True, stop=lambda: False))
    assert out == [(k, k * 10) for k in range(6)] and sorted(started) == list(range(6))
    stopped = list(s.loader.read_ahead(list(range(6)), load, window=2, inline=False, stop=lambda: True))
    assert stopped == []
    it = s.loader.read_ahead(list(range(100)), load, window=4, inline=True, stop=lambda: False)
    assert next(it) == (0, 0)
    it.close()  # the loads not started are cancelled


def test_erase_deletes_from_every_tier_and_counts_each_block_once(make_store):
    s = make_store(write_policy="write_through")
    keys = s.put(NS, tokens_for(2, 3), [payload(2, i) for i in range(3)], durable=True).keys
    assert all(s.where(k) == "hot" for k in keys) and all(cold_of(s).contains(k) for k in keys)
    assert s.loader.erase(keys) == 3
    assert all(s.where(k) is None for k in keys) and s.check() == []
