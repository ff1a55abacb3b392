"""Sessions of :class:`~tiering.store.TieredStore`: records queued with their blocks, resume, delete,
invalidation by namespace or model, TTL expiry and the maintenance thread.

A mixin: it uses the store's lock, writer and tiers, and is not meant to stand alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

from opentelemetry import trace

from .errors import InvalidBlock, SessionNotFound, TierUnavailable
from .keys import BlockKey, Namespace
from .results import PrefetchHandle
from .sessions import Session, session_id_key
from .spans import session_hash
from .writer import WriteJob

log = logging.getLogger(__name__)


class SessionsMixin:
    """Session records, resume, deletion, invalidation and expiry."""

    def _store_session(self, session: Session, job: WriteJob | None = None) -> None:
        self._submit_sessions({session.id_key: session.to_json()}, job)

    def _submit_sessions(self, records: dict[bytes, bytes | None], job: WriteJob | None = None) -> Future | None:
        """Queue session records (None deletes) for the writer, or keep them in memory without a cold tier.

        Until committed they are readable from ``_pending_sessions``, so a session written a moment ago
        is visible to its next read without waiting for the disk.
        """
        with self._lock:
            if self._writer is None:
                for sid, rec in records.items():
                    if rec is None:
                        self._mem_sessions.pop(sid, None)
                    else:
                        self._mem_sessions[sid] = rec
                return None
            self._pending_sessions.update(records)
            for sid in records:
                self._pending_session_writes[sid] = self._pending_session_writes.get(sid, 0) + 1
        if job is not None:
            job.sessions.update(records)
            return None
        return self._writer.submit(WriteJob(sessions=dict(records)))

    def _load_session(self, sid: bytes) -> Session | None:
        with self._lock:
            if self._writer is None:
                raw = self._mem_sessions.get(sid)
            elif sid in self._pending_sessions:
                raw = self._pending_sessions[sid]
            else:
                raw = self.cold.session_get(sid)
        return None if raw is None else Session.from_json(raw)

    def get_session(self, tenant: str, session_id: str) -> Session:
        """The session's record.

        :raises SessionNotFound: if there is none for this tenant, or it expired.
        """
        self._check_open()
        sid = session_id_key(tenant, session_id)
        trace.get_current_span().set_attribute("kvtier.session", session_hash(sid))
        session = self._load_session(sid)
        if session is None or session.expired():
            raise SessionNotFound(f"no session {session_id!r} for this tenant (never stored, deleted or expired)")
        return session

    def resume(self, tenant: str, session_id: str, *, deadline: float | None = None
               ) -> tuple[Session, list[str | None], PrefetchHandle]:
        """Start bringing a session's blocks up to the top tier; return its manifest at once.

        :returns: the session, the tier of each of its blocks *before* the prefetch (None: gone),
            and the running prefetch.
        :raises SessionNotFound: see :meth:`get_session`.
        """
        t0 = time.monotonic()
        session = self.get_session(tenant, session_id)
        tiers = self._where(session.keys)
        handle = self.prefetch(session.keys, deadline=deadline)
        handle.future.add_done_callback(lambda _f: self._report_timing("resume", t0))
        with self._lock:
            # Touch the record as it is *now*: a put that extended the session since we read it
            # must not be overwritten by our older copy.
            current = self._load_session(session.id_key)
            if current is not None and current.keys == session.keys:
                current.last_used = time.time()
                self._store_session(current)
        return session, tiers, handle

    def delete_session(self, tenant: str, session_id: str, *, erase_blocks: bool = False) -> int:
        """Forget a session; with ``erase_blocks`` also delete its blocks from every tier (even if
        other sessions of the tenant share them: they will miss and recompute — privacy first).

        :returns: blocks erased.
        :raises SessionNotFound: if there is no such session.
        """
        session = self.get_session(tenant, session_id)
        return self._delete_session(session, erase_blocks)

    def _delete_session(self, session: Session, erase_blocks: bool) -> int:
        erased = self._erase(session.keys) if erase_blocks else 0
        fut = self._submit_sessions({session.id_key: None})
        if fut is not None:
            fut.result()
        return erased

    def _erase(self, keys: Sequence[BlockKey]) -> int:
        """Delete ``keys`` from every tier and the write queue; returns how many were anywhere."""
        keys = set(keys)
        gone: set[BlockKey] = set()  # a block held by several tiers counts once
        with self._lock:
            # reads already running may hold these blocks: they must not put them back (tombstones)
            self._tombstones.begin_erase(keys)
            for k in keys:
                self._inflight.pop(k, None)  # a load begun before the erase is not shared with later reads
            for tier in self.memory:
                gone.update(k for k in keys if tier.delete(k))
            gone.update(k for k in keys if self._pending.pop(k, None) is not None)
        try:
            if self._writer is not None:
                self._writer.flush()
                ordered = list(keys)
                gone.update(k for k, here in zip(ordered, self.cold.contains_many(ordered)) if here)
                self.cold.delete_many(ordered)
        finally:
            with self._lock:
                self._tombstones.end_erase(keys)
        return len(gone)

    def invalidate(self, tenant: str, *, model: str | None = None, revision: str | None = None,
                   namespace: Namespace | None = None) -> int:
        """Delete every block and session of a namespace, or of every namespace of ``model`` (at
        ``revision`` when given) of this tenant.

        :returns: blocks deleted.
        """
        self._check_open()
        self.flush()
        if namespace is not None:
            ns_ids = {namespace.ns_id}
        elif model:
            with self._lock:
                ns_ids = {i for i, ns in self._namespaces.items() if ns.tenant == tenant and ns.model == model
                          and (revision is None or ns.revision == revision)}
        else:
            raise InvalidBlock("invalidate needs a namespace or a model", field="model")
        gone: set[BlockKey] = set()  # a block held by several tiers counts once
        with self._lock:
            self._tombstones.begin_erase(ns_ids)  # running reads must not put them back
            for tier in self.memory:
                for k in list(tier.keys()):
                    b = tier.peek(k)
                    if b is not None and b.ns_id in ns_ids and tier.delete(k):
                        gone.add(k)
        marked: list[BlockKey] = []
        try:
            if self.cold is not None:
                for ns_id in ns_ids:
                    keys = self.cold.keys_of_namespace(ns_id)
                    with self._lock:  # by key too: a block loaded meanwhile may no longer know its namespace
                        self._tombstones.begin_erase(keys)
                        marked += keys
                    self.cold.delete_many(keys)
                    gone.update(keys)
        finally:
            with self._lock:
                self._tombstones.end_erase([*ns_ids, *marked])
        n = len(gone)
        dead = [s for s in self.sessions() if s.namespace.ns_id in ns_ids]
        fut = self._submit_sessions({s.id_key: None for s in dead}) if dead else None
        if fut is not None:
            fut.result()
        log.info("invalidated %d blocks and %d sessions in %d namespaces", n, len(dead), len(ns_ids))
        return n

    def sessions(self) -> list[Session]:
        """Every session record (expired ones included until the sweeper removes them)."""
        with self._lock:
            if self.cold is None:
                merged = dict(self._mem_sessions)
            else:
                merged = dict(self.cold.session_items())
                merged.update(self._pending_sessions)
        return [Session.from_json(r) for r in merged.values() if r is not None]

    def expire_sessions(self) -> int:
        """Delete sessions whose TTL has passed, with their blocks. Returns how many expired."""
        now = time.time()
        dead = [s for s in self.sessions() if s.expired(now)]
        for s in dead:
            # Not delete_session: get_session treats an expired session as absent, so it would
            # raise SessionNotFound and the session and its blocks would stay forever.
            self._delete_session(s, erase_blocks=True)
        return len(dead)

    def _maintenance(self) -> None:
        last_ttl = 0.0
        while not self._stop.wait(self.config.maintenance_s):
            try:
                self.leases.sweep()
                if time.monotonic() - last_ttl > 10 * self.config.maintenance_s:
                    last_ttl = time.monotonic()
                    if self.expire_sessions():
                        log.info("expired sessions removed")
            except TierUnavailable:
                return
            except Exception:  # the sweeper must outlive any single failure
                log.exception("maintenance pass failed")
