"""tiering/writebehind.py: the write queue as a tier: reads answer from the queue, commits make room by
the cold policy under the pins, records travel with their blocks, listeners hear every commit."""

from __future__ import annotations

import threading
from unittest import mock

from test_tier_contract import B, K, N, fill, never

from kvtier.tiering.writebehind import WriteBehindTier
from kvtier.tiering.writer import WriteJob


def test_a_queued_block_is_served_from_the_queue_under_its_name(cold):
    wb = WriteBehindTier(cold, batch=4, threads=1, protected=never, queue_name="warm")
    gate = threading.Event()
    real = cold.write_batch
    with mock.patch.object(cold, "write_batch", side_effect=lambda *a, **kw: (gate.wait(5), real(*a, **kw))[1]):
        wb.put(K(1), B(1))
        assert wb.queued(K(1)) is not None and not cold.contains(K(1))
        assert wb.read(K(1))[1] == "warm" and wb.locate([K(1)]) == ["warm"] and wb.fetch(K(1)).tier == "warm"
        assert wb.queue_depth()[0] == 1
        gate.set()
        wb.flush()
    assert wb.queued(K(1)) is None and cold.contains(K(1))
    assert wb.read(K(1))[1] == "cold" and wb.locate([K(1)]) == ["cold"]
    wb.close()


def test_commits_make_room_oldest_first_and_spare_the_pins(cold):
    pinned: set = set()
    wb = WriteBehindTier(cold, batch=4, threads=1, protected=lambda k: k in pinned)
    evicted = []
    wb.on_commit(lambda jobs, ev, err: evicted.extend(ev))
    keys = fill(wb)
    pinned.add(keys[0])
    wb.put(K(5000), B(5000))
    wb.flush()
    assert wb.contains(K(5000)) and wb.contains(keys[0])  # the oldest is pinned: the next oldest went
    assert evicted == [keys[1]] and not wb.contains(keys[1]) and wb.check() == []
    wb.close()


def test_records_commit_with_their_blocks_and_listeners_hear_them(cold):
    wb = WriteBehindTier(cold, batch=4, threads=1, protected=never)
    heard = []
    wb.on_commit(lambda jobs, ev, err: heard.append((len(jobs), err)))
    fut = wb.submit(WriteJob(blocks=[(K(1), B(1))], sessions={b"t\0s": b"{}"}, namespaces={b"n" * 16: b"{}"}))
    assert fut.result(5) == 1 and heard and heard[-1][1] is None
    assert wb.session_get(b"t\0s") == b"{}" and b"n" * 16 in wb.namespaces()
    assert wb.session_census(b"t\0", [b"t\0s", b"t\0x"]) == (1, [True, False])
    assert wb.enqueue(K(2), B(2))
    wb.flush()
    assert wb.enqueue(K(2), B(2))  # committed, so queued again: a write-back demotion rewrites it
    assert set(wb.delete_many([K(1), K(2), K(3)])) == {K(1), K(2)}
    assert not wb.contains(K(1)) and not wb.contains(K(2)) and wb.check() == []
    wb.close()


def test_enqueue_skips_a_block_already_queued(cold):
    wb = WriteBehindTier(cold, batch=4, threads=1, protected=never)
    gate = threading.Event()
    real = cold.write_batch
    with mock.patch.object(cold, "write_batch", side_effect=lambda *a, **kw: (gate.wait(5), real(*a, **kw))[1]):
        assert wb.enqueue(K(1), B(1)) and not wb.enqueue(K(1), B(1))
        gate.set()
        wb.flush()
    assert cold.block_count() == 1 and wb.used_bytes >= N
    wb.close()
