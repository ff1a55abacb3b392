"""WriteBehindTier: the cold tier and its writer thread as one tier, whose queue answers reads first.

Imports ``cold``, ``writer`` and ``tier``. A block put here is queued for the
:class:`~tiering.writer.ColdWriter`, which commits batches to the :class:`~tiering.cold.ColdTier` in
submission order; until its batch is committed the block is served from the queue (named
``queue_name``: it is still in host RAM), so nothing queued is ever a miss. Room in the cold tier is
made at commit time by the cold tier's policy (oldest-written first) under ``protected`` (the pins).
Session and namespace records travel in the same jobs (:meth:`submit`), so a session record is never
committed before the blocks it names.

Thread-safety: every method may be called from any thread; the queue has its own lock, never held
across I/O. :meth:`on_commit` listeners run on the writer thread after the queue has forgotten the
committed blocks.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future

from opentelemetry import trace

from .cold import ColdTier
from .keys import BlockKey
from .spans import TierOps, now_ns
from .tier import Block, Fetched, Tier
from .writer import ColdWriter, WriteJob

#: ``listener(jobs, evicted keys, error or None)``, called after each commit (see :meth:`WriteBehindTier.on_commit`)
CommitListener = Callable[[list[WriteJob], list[BlockKey], BaseException | None], None]


class WriteBehindTier(Tier):
    """The durable tier of a store: writes are asynchronous, reads answer from the queue first.

    :param cold: the tier committed to (closed by :meth:`close`).
    :param batch: blocks per LMDB transaction at most. :param threads: compression threads.
    :param protected: keys the cold tier must not evict when making room (pinned ones).
    :param tracer: for the writer's ``kvtier.lmdb.commit`` spans.
    :param queue_name: the tier name reported for a block served from the queue (``warm`` when the
        store has a warm tier: the bytes are in host RAM).
    """

    slow = True
    usage_group = "cold"

    def __init__(self, cold: ColdTier, *, batch: int, threads: int, protected: Callable[[BlockKey], bool],
                 tracer: trace.Tracer | None = None, queue_name: str | None = None) -> None:
        self.cold = cold
        self.name = cold.name
        self.queue_name = queue_name or cold.name
        self._lock = threading.Lock()
        self._pending: dict[BlockKey, Block] = {}
        self._listeners: list[CommitListener] = []
        self._writer = ColdWriter(cold, batch=batch, threads=threads, protected=protected,
                                  on_commit=self._committed, tracer=tracer)

    # -- writes -----------------------------------------------------------------------------------------
    def on_commit(self, listener: CommitListener) -> None:
        """Call ``listener(jobs, evicted, error)`` after every commit, on the writer thread."""
        self._listeners.append(listener)

    def submit(self, job: WriteJob) -> Future:
        """Queue ``job`` (blocks, session and namespace records, committed together); its blocks are
        readable from the queue at once. The future resolves once committed.

        :raises TierUnavailable: after :meth:`close`.
        """
        with self._lock:
            for key, block in job.blocks:
                self._pending[key] = block
        return self._writer.submit(job)

    def enqueue(self, key: BlockKey, block: Block) -> bool:
        """Queue one block unless it is queued already (a write-back demotion). Returns whether it was."""
        with self._lock:
            if key in self._pending:
                return False
            self._pending[key] = block
        self._writer.submit(WriteJob(blocks=[(key, block)]))
        return True

    def put(self, key: BlockKey, block: Block) -> None:
        """Queue ``block``; a commit that finds the cold tier full and everything pinned fails later
        (the writer logs it, :meth:`flush` returns once it is decided)."""
        self.submit(WriteJob(blocks=[(key, block)]))

    def _committed(self, jobs: list[WriteJob], evicted: list[BlockKey], error: BaseException | None) -> None:
        with self._lock:
            for job in jobs:
                for key, block in job.blocks:
                    if self._pending.get(key) is block:
                        del self._pending[key]
        for listener in self._listeners:
            listener(jobs, evicted, error)

    def delete_many(self, keys: Iterable[BlockKey]) -> list[BlockKey]:
        """Drop ``keys`` from the queue and, once everything queued before is committed, from disk."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            gone = {k for k in keys if self._pending.pop(k, None) is not None}
        self._writer.flush()
        on_disk = self.cold.contains_many(keys)
        self.cold.delete_many(keys)
        return [k for k, here in zip(keys, on_disk) if here or k in gone]

    def delete(self, key: BlockKey) -> bool:
        return bool(self.delete_many([key]))

    def flush(self, timeout: float | None = None) -> None:
        self._writer.flush(timeout)

    def close(self) -> None:
        """Commit everything queued, stop the writer, close the cold tier. Idempotent."""
        self._writer.close()
        self.cold.close()

    # -- reads ------------------------------------------------------------------------------------------
    def queued(self, key: BlockKey) -> Block | None:
        """The block if it is waiting in the queue (a peek)."""
        with self._lock:
            return self._pending.get(key)

    def contains_many(self, keys: Iterable[BlockKey]) -> list[bool]:
        keys = list(keys)
        with self._lock:
            queued = [k in self._pending for k in keys]
        if all(queued):
            return queued
        return [q or d for q, d in zip(queued, self.cold.contains_many(keys))]

    def contains(self, key: BlockKey) -> bool:
        return self.contains_many([key])[0]

    def locate(self, keys: list[BlockKey]) -> list[str | None]:
        with self._lock:
            out = [self.queue_name if k in self._pending else None for k in keys]
        missing = [i for i, t in enumerate(out) if t is None]
        if missing:
            for i, here in zip(missing, self.cold.contains_many([keys[i] for i in missing])):
                if here:
                    out[i] = self.name
        return out

    def get(self, key: BlockKey) -> Block | None:
        got = self.read(key)
        return None if got is None else got[0]

    def read(self, key: BlockKey, ops: TierOps | None = None) -> tuple[Block, str] | None:
        t0 = now_ns() if ops is not None else 0
        block = self.queued(key)
        if block is not None:
            if ops is not None:
                ops.record(f"{self.queue_name}.read", t0, now_ns(), nbytes=block.nbytes)
            return block, self.queue_name
        return self.cold.read(key, ops)

    def fetch(self, key: BlockKey, ops: TierOps | None = None) -> Fetched | None:
        block = self.queued(key)
        if block is not None:
            return Fetched(self.queue_name, block.nbytes, block.ns_id, block=block)
        return self.cold.fetch(key, ops)

    def ns_of(self, key: BlockKey) -> bytes | None:
        block = self.queued(key)
        return block.ns_id if block is not None else self.cold.ns_of(key)

    def keys(self) -> Iterator[BlockKey]:
        with self._lock:
            queued = list(self._pending)
        return iter(list(dict.fromkeys([*queued, *self.cold.keys()])))

    def keys_of_namespace(self, ns_id: bytes) -> list[BlockKey]:
        with self._lock:
            queued = [k for k, b in self._pending.items() if b.ns_id == ns_id]
        return list(dict.fromkeys([*queued, *self.cold.keys_of_namespace(ns_id)]))

    def record(self, key: BlockKey) -> bytes | None:
        """The committed record of ``key`` as stored (encoded, sealed when encryption is on), or ``None``."""
        return self.cold.get_record(key)

    # -- session and namespace records (committed by the writer with the blocks) --------------------------
    def session_get(self, sid: bytes) -> bytes | None:
        return self.cold.session_get(sid)

    def session_items(self) -> list[tuple[bytes, bytes]]:
        return self.cold.session_items()

    def session_census(self, prefix: bytes, sids: list[bytes]) -> tuple[int, list[bool]]:
        return self.cold.session_census(prefix, sids)

    def namespaces(self) -> dict[bytes, dict]:
        return self.cold.namespaces()

    # -- eviction and accounting: the cold tier's (queued blocks are not counted until committed) ----------
    def victims(self, nbytes: int, protected: Callable[[BlockKey], bool]) -> list[BlockKey] | None:
        return self.cold.victims(nbytes, protected)

    def evict(self, keys: list[BlockKey]) -> list[tuple[BlockKey, Block | None]]:
        return self.cold.evict(keys)

    @property
    def checksum_failures(self) -> int:  # type: ignore[override]
        return self.cold.checksum_failures

    @property
    def capacity_bytes(self) -> int:
        return self.cold.capacity_bytes

    @property
    def used_bytes(self) -> int:
        return self.cold.used_bytes

    def ns_used_bytes(self, ns_ids: Iterable[bytes]) -> int:
        return self.cold.ns_used_bytes(ns_ids)

    def block_count(self) -> int:
        return self.cold.block_count()

    def queue_depth(self) -> tuple[int, int]:
        """``(blocks waiting in the queue, jobs waiting for the writer)``."""
        with self._lock:
            return len(self._pending), self._writer.depth()

    def check(self) -> list[str]:
        return self.cold.check()
