"""SessionRecords: a store's session records, queued to the durable tier with their blocks.

Imports ``sessions`` and ``writer`` (the job type). Until committed, a record is served from this
object's overlay, so a session written a moment ago is visible to its next read without waiting for the
disk; without a durable tier records live in memory only. Thread-safe (its own lock).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future

from .sessions import Session
from .writer import WriteJob


class SessionRecords:
    """Session records over ``durable`` (a :class:`~tiering.tierlist.DurableTier`, or ``None``).

    Register :meth:`committed` as the durable tier's commit listener.
    """

    def __init__(self, durable=None) -> None:
        self.durable = durable
        self._lock = threading.RLock()
        self._memory: dict[bytes, bytes] = {}  # the records, when there is no durable tier
        self._pending: dict[bytes, bytes | None] = {}  # queued for the writer, newer than the disk
        self._pending_writes: dict[bytes, int] = {}  # queued, uncommitted writes per session

    def submit(self, records: dict[bytes, bytes | None], job: WriteJob | None = None) -> Future | None:
        """Queue session records (``None`` deletes): into ``job`` when given (committed with its blocks),
        else in a job of their own whose future is returned. Without a durable tier they are kept in
        memory and ``None`` is returned."""
        with self._lock:
            if self.durable is None:
                for sid, rec in records.items():
                    if rec is None:
                        self._memory.pop(sid, None)
                    else:
                        self._memory[sid] = rec
                return None
            self._pending.update(records)
            for sid in records:
                self._pending_writes[sid] = self._pending_writes.get(sid, 0) + 1
        if job is not None:
            job.sessions.update(records)
            return None
        return self.durable.submit(WriteJob(sessions=dict(records)))

    def load(self, sid: bytes) -> Session | None:
        with self._lock:
            if self.durable is None:
                raw = self._memory.get(sid)
            elif sid in self._pending:
                raw = self._pending[sid]
            else:
                raw = self.durable.session_get(sid)
        return None if raw is None else Session.from_json(raw)

    def update(self, sid: bytes, change: Callable[[Session | None], Session | None],
               job: WriteJob | None = None) -> Session | None:
        """Read-modify-write of one record, atomic against other updates: ``change(current)`` returns
        the record to store (``None``: leave it as it is)."""
        with self._lock:
            new = change(self.load(sid))
            if new is not None:
                self.submit({sid: new.to_json()}, job)
            return new

    def all(self) -> list[Session]:
        """Every session record (expired ones included until swept)."""
        with self._lock:
            if self.durable is None:
                merged = dict(self._memory)
            else:
                merged = dict(self.durable.session_items())
                merged.update(self._pending)
        return [Session.from_json(r) for r in merged.values() if r is not None]

    def count(self, tenant: str) -> int:
        """Sessions of ``tenant``, expired ones included until swept (O(the tenant's sessions))."""
        prefix = tenant.encode("utf-8") + b"\0"
        with self._lock:
            if self.durable is None:
                return sum(1 for sid in self._memory if sid.startswith(prefix))
            pending = {sid: rec for sid, rec in self._pending.items() if sid.startswith(prefix)}
        stored, on_disk = self.durable.session_census(prefix, list(pending))
        # queued records change the count: a new session adds one, a queued deletion removes one
        return stored + sum((rec is not None) - here for rec, here in zip(pending.values(), on_disk))

    def queued(self) -> int:
        """Sessions with records queued and not yet committed."""
        with self._lock:
            return len(self._pending)

    def committed(self, jobs: list[WriteJob], _evicted, _error) -> None:
        """Commit listener: forget overlay entries whose every queued write is now decided."""
        with self._lock:
            for job in jobs:
                for sid in job.sessions:
                    # Count, not compare: two deletions queued for one session are both None, so an
                    # identity check would let the first commit drop the second (and expose a record
                    # queued between them). The newest value stays until all its writes are on disk.
                    left = self._pending_writes.get(sid, 1) - 1
                    if left > 0:
                        self._pending_writes[sid] = left
                    else:
                        self._pending_writes.pop(sid, None)
                        self._pending.pop(sid, None)
