"""Retention: which blocks a session keeps alive — priorities for eviction, and erases that spare
blocks another live session names. Imports ``policies`` (priorities), ``sessions`` and the loader's
erase (passed in).

A block is shared by every session of a tenant whose chain names it. Erasing a session's blocks
(``DeleteSession(erase_blocks)``, TTL expiry) erases only those no other live (unexpired) session
names. A session's priority is given to every block it names (the highest wins) and orders each memory
tier's victims through :class:`~tiering.policies.PriorityPolicy`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable

from .keys import BlockKey
from .policies import Priorities, PriorityPolicy
from .sessions import Session


class Retention:
    """Session-aware erases and priorities over a store's caches.

    :param caches: the memory tiers: each one's policy is wrapped in a :class:`PriorityPolicy`.
    :param sessions: every session record now (``SessionRecords.all``).
    :param erase: deletes keys from every tier, returning how many were anywhere (``Loader.erase``).
    :param lock: the store's lock (guards the priority table, which the policies read under it).
    """

    def __init__(self, caches: Iterable, sessions: Callable[[], list[Session]],
                 erase: Callable[[list[BlockKey]], int], lock: threading.RLock) -> None:
        self._sessions = sessions
        self._erase = erase
        self._lock = lock
        self.priorities = Priorities()
        for s in sessions():  # after a restart, priorities come back with the session records
            self.priorities.raise_to(s.keys, s.priority)
        for tier in caches:
            tier.policy = PriorityPolicy(tier.policy, self.priorities)

    def erase_exclusive(self, sessions: list[Session], *, shared: bool = True) -> int:
        """Erase the blocks of ``sessions`` that no other live (unexpired) session names; returns how
        many were anywhere. Without ``shared`` the tier shared with other hosts keeps its copies (a
        local expiry: another host may still use them). O(every session's keys)."""
        now, leaving = time.time(), {s.id_key for s in sessions}
        kept = {k for s in self._sessions() if s.id_key not in leaving and not s.expired(now) for k in s.keys}
        gone = [k for s in sessions for k in s.keys if k not in kept]
        with self._lock:
            self.priorities.forget(gone)
        return self._erase(gone, shared=shared)
