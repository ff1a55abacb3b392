"""Fleet: what a store shares with other hosts through its shared tier (the remote tier): blocks and sessions.

Imports ``keys``, ``sessions``, ``namespaces`` and ``writer`` (the job type). Writes follow the shared tier's
write mode: ``all``: every commit of the durable tier is written asynchronously (blocks first, then its
session records, off the caller's path); ``durable``: a durable put, once committed locally, writes
its chain's blocks and then its session record synchronously, each acknowledged by the configured
replicas (``WAIT``); ``off``: nothing. A session update from two hosts at once leaves the record with
the later ``last_used`` (last writer wins, whole: never a mix). Reads: a session record is taken from
the shared tier when it is newer than the local one (or there is none locally).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from .keys import BlockKey, Namespace
from .namespaces import NamespaceRegistry
from .sessions import Session
from .writer import WriteJob

log = logging.getLogger(__name__)


def version_of(record: bytes) -> int:
    """The shared version of a session record: its ``last_used`` in ns (last writer wins by it)."""
    return max(0, int(json.loads(record)["last_used"] * 1e9))


class Fleet:
    """Feeds the shared tier of ``tiers`` (a :class:`~tiering.remote.block_tier.RemoteBlockTier`) from
    their durable tier (it listens to its commits) and reads shared sessions; a namespace met there is
    registered in ``namespaces`` (its record queued to the durable tier). Without a shared tier every
    method does nothing (reads find nothing). Thread-safe (no state of its own).
    """

    def __init__(self, tiers, namespaces: NamespaceRegistry) -> None:
        self.shared = tiers.shared
        self.durable = tiers.durable
        self.namespaces = namespaces
        if self.shared is not None and self.durable is not None:
            self.durable.on_commit(self.committed)

    # -- writes ---------------------------------------------------------------------------------------
    def committed(self, jobs: list[WriteJob], _evicted, error: BaseException | None) -> None:
        """Commit listener (writer thread): in mode ``all``, queue the committed blocks, then the
        session records, for the shared tier; a durable job is left to :meth:`durable_put`."""
        if error is not None or self.shared is None or self.shared.write_mode != "all":
            return
        blocks = [(key, rec) for job in jobs if not job.durable
                  for (key, _b), rec in zip(job.blocks, job.records)]
        if blocks:
            self.shared.put_records(blocks, durable=False)
        for job in jobs:
            if job.durable:
                continue
            for sid, rec in job.sessions.items():
                if rec is not None:
                    self.shared.session_put(sid, rec, version_of(rec), durable=False)

    def durable_put(self, keys: Sequence[BlockKey], job: WriteJob, sid: bytes | None) -> None:
        """After a durable put committed ``job`` locally: write the blocks of ``keys`` the shared tier
        lacks (from the job, else read back from the durable tier), then the session record of ``sid``,
        each acknowledged by the required replicas. Nothing in mode ``off``.

        :raises RemoteWriteFailed: (``TierUnavailable``, naming the remote tier) when not acknowledged.
        """
        if self.shared is None or self.shared.write_mode == "off":
            return
        keys = list(dict.fromkeys(keys))
        mine = dict(zip((k for k, _b in job.blocks), job.records))
        there = self.shared.contains_many(keys)
        items = []
        for key, here in zip(keys, there):
            if here:
                continue
            record = mine.get(key)
            if record is None and self.durable is not None:
                record = self.durable.record(key)
            if record is not None:
                items.append((key, record))
        if items:
            self.shared.put_records(items, durable=True)
        record = job.sessions.get(sid) if sid is not None else None
        if record is not None:
            self.shared.session_put(sid, record, version_of(record), durable=True)

    # -- sessions ---------------------------------------------------------------------------------------
    def session(self, sid: bytes, local: Session | None) -> Session | None:
        """``local`` (the store's own record of ``sid``), or the shared tier's when that is newer (its
        keys are then learnt under its namespace, so the shared tier serves them)."""
        raw = self.shared.session_get(sid) if self.shared is not None else None
        if raw is None:
            return local
        try:
            found = Session.from_json(raw)
        except (ValueError, KeyError, TypeError):
            log.warning("shared session record unreadable; ignored")
            return local
        if local is not None and found.last_used <= local.last_used:
            return local
        self.learn(found.namespace, found.keys)
        return found

    def forget_sessions(self, sids: Sequence[bytes]) -> None:
        """Delete the shared records. :raises TierUnavailable: if the shared tier cannot be reached."""
        if self.shared is not None:
            for sid in sids:
                self.shared.session_delete(sid)

    def found(self, namespace: Namespace, keys: Sequence[BlockKey], tiers: list[str], tokens: int) -> int:
        """A lookup found ``tiers`` (the prefix's, of ``tokens`` tokens): learns the blocks only the
        shared tier holds (so reads are served from there) and returns their tokens."""
        if self.shared is None:
            return 0
        bt = namespace.layout.block_tokens
        remote = [i for i, t in enumerate(tiers) if t == self.shared.name]
        if remote:
            self.learn(namespace, [keys[i] for i in remote])
        return sum(min(bt, tokens - i * bt) for i in remote)

    def learn(self, namespace: Namespace, keys: Sequence[BlockKey]) -> None:
        """Keys chained under ``namespace`` (and found in the shared tier): the shared tier may serve
        them, and ``namespace`` is registered (so its blocks pass the tenant checks)."""
        self.shared.learn(keys, namespace.ns_id)
        new = self.namespaces.register(namespace)
        if new and self.durable is not None:
            self.durable.submit(WriteJob(namespaces=new))

    def snapshot(self) -> dict:
        """``{"shared": {"tier": name, **state and counters}}`` for the store's snapshot, or ``{}``."""
        return {} if self.shared is None else {"shared": {"tier": self.shared.name, **self.shared.stats()}}
