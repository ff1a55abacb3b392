"""tiering/leases.py: pins count per key and expire on their own (clock injected)."""

from __future__ import annotations

import threading

from kvtier.tiering.leases import LeaseTable


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_pins_count_and_release():
    t = LeaseTable(Clock())
    a = t.acquire([1, 2], 10)
    b = t.acquire([2, 3], 10)
    assert t.is_pinned(2) and t.pinned_keys() == 3 and t.active() == 2
    assert t.release(a)
    assert not t.is_pinned(1) and t.is_pinned(2)
    assert not t.release(a)  # already ended
    assert t.release(b) and t.pinned_keys() == 0 and t.active() == 0


def test_leases_expire():
    clock = Clock()
    t = LeaseTable(clock)
    a = t.acquire([1], 5)
    t.acquire([1, 2], 1)
    clock.now += 1
    assert t.sweep() == 1 and t.is_pinned(1) and not t.is_pinned(2)
    clock.now += 4
    assert t.active() == 0 and not t.is_pinned(1)
    assert not t.release(a)


def test_zero_and_negative_ttl_expire_at_once():
    t = LeaseTable(Clock())
    t.acquire([1], 0)
    t.acquire([2], -3)
    assert t.active() == 0


def test_duplicate_keys_in_one_lease():
    t = LeaseTable(Clock())
    lid = t.acquire([7, 7], 5)
    assert t.is_pinned(7)
    t.release(lid)
    assert not t.is_pinned(7) and t.pinned_keys() == 0


def test_thread_safe():
    t = LeaseTable()

    def work():
        for _ in range(500):
            t.release(t.acquire([1, 2, 3], 60))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert t.active() == 0 and t.pinned_keys() == 0


def test_extend_renews_a_live_lease_and_not_an_ended_one():
    now = [0.0]
    table = LeaseTable(clock=lambda: now[0])
    lease = table.acquire(["a"], 1.0)
    now[0] = 0.9
    assert table.extend(lease, 1.0)  # now ends at 1.9
    now[0] = 1.5
    table.sweep()
    assert table.is_pinned("a")
    now[0] = 2.0
    table.sweep()
    assert not table.is_pinned("a")
    assert not table.extend(lease, 5.0)
