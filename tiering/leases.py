"""Leases: pins that protect blocks from eviction and expire on their own.
Imports the standard library only.

Every reader and every prefetch pins the blocks it is about to use with a lease. A lease ends when it
is released or when its time runs out, whichever comes first, so a crashed client or a forgotten
release can never pin a block forever (the leaked-pin bug class of other KV caches).
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Hashable, Iterable


class LeaseTable:
    """Counts active pins per key. Thread-safe.

    :param clock: monotonic clock, injectable for tests.
    """

    def __init__(self, clock=time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._ids = itertools.count(1)
        self._leases: dict[int, tuple[tuple[Hashable, ...], float]] = {}
        self._pins: dict[Hashable, int] = {}

    def acquire(self, keys: Iterable[Hashable], ttl_s: float) -> int:
        """Pin ``keys`` for at most ``ttl_s`` seconds. Returns the lease id to release."""
        keys = tuple(keys)
        with self._lock:
            lease = next(self._ids)
            self._leases[lease] = (keys, self._clock() + max(ttl_s, 0.0))
            for k in keys:
                self._pins[k] = self._pins.get(k, 0) + 1
            return lease

    def extend(self, lease: int, ttl_s: float) -> bool:
        """Make a live lease end ``ttl_s`` seconds from now. Returns False if it had already ended."""
        with self._lock:
            entry = self._leases.get(lease)
            if entry is None:
                return False
            self._leases[lease] = (entry[0], self._clock() + max(ttl_s, 0.0))
            return True

    def release(self, lease: int) -> bool:
        """End a lease early. Returns False if it had already ended (expired or released)."""
        with self._lock:
            return self._drop(lease)

    def _drop(self, lease: int) -> bool:
        entry = self._leases.pop(lease, None)
        if entry is None:
            return False
        for k in entry[0]:
            n = self._pins[k] - 1
            if n:
                self._pins[k] = n
            else:
                del self._pins[k]
        return True

    def sweep(self) -> int:
        """End every lease whose time is up. Returns how many ended."""
        now = self._clock()
        with self._lock:
            expired = [lid for lid, (_, until) in self._leases.items() if until <= now]
            for lid in expired:
                self._drop(lid)
            return len(expired)

    def is_pinned(self, key: Hashable) -> bool:
        """True while a lease not yet swept covers ``key``. Call :meth:`sweep` first to drop expired ones."""
        return key in self._pins

    def pinned_keys(self) -> int:
        """Distinct keys pinned right now."""
        self.sweep()
        return len(self._pins)

    def active(self) -> int:
        """Leases not yet ended."""
        self.sweep()
        return len(self._leases)
