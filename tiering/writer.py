"""ColdWriter: the background thread that puts blocks and session records into the cold tier.
Imports opentelemetry, ``cold``, ``errors``, ``keys``, ``tier`` only.

Callers :meth:`submit` a :class:`WriteJob` and get a future; the writer drains the queue in batches,
compresses the blocks on a small thread pool (zstd releases the GIL, so 2 cores really work in
parallel) *before* opening the write transaction, commits one short LMDB transaction per batch, then
resolves the futures of that batch. Jobs commit in submission order, so a session record submitted
after its blocks is never visible without them. :meth:`flush` waits until everything submitted so far
is committed; :meth:`close` flushes and stops the thread.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from opentelemetry import trace

from .cold import ColdTier, ColdWrite
from .errors import CapacityExceeded, KVTierError, TierUnavailable
from .keys import BlockKey
from .tier import Block

log = logging.getLogger(__name__)


@dataclass(slots=True)
class WriteJob:
    """Blocks, session records and namespace records to commit together, in order."""

    blocks: list[tuple[BlockKey, Block]] = field(default_factory=list)
    sessions: dict[bytes, bytes | None] = field(default_factory=dict)
    namespaces: dict[bytes, bytes] = field(default_factory=dict)
    future: Future = field(default_factory=Future)
    #: encoded bytes of this job's blocks, set by the writer once encoded (for the compression ratio)
    record_bytes: int = 0
    #: the encoded (sealed) record of each block, in ``blocks`` order, set by the writer once encoded
    records: list[bytes] = field(default_factory=list)
    #: queued by a durable put (which writes its blocks to a shared tier itself, synchronously)
    durable: bool = False
    #: span context of the request that queued the job (set by :meth:`ColdWriter.submit` when None);
    #: the ``kvtier.lmdb.commit`` span links to it
    trace_context: trace.SpanContext | None = None
    #: the request was answered before the commit (a non-durable put, a write-back demotion): nobody
    #: waits on the future, so a failure is counted and logged (``background_write_failures``)
    acknowledged: bool = False


class ColdWriter:
    """Single writer thread in front of a :class:`ColdTier`.

    :param cold: the tier written to.
    :param batch: blocks per transaction at most.
    :param threads: compression threads.
    :param protected: keys the cold tier must not evict (pinned ones).
    :param on_commit: called after each commit with (committed job list, evicted keys) — the store
        uses it to drop pending entries and count evictions. Called on the writer thread.
    :param tracer: opens one ``kvtier.lmdb.commit`` span per transaction, linked to the requests of
        its jobs (no-op tracer when omitted).
    """

    def __init__(self, cold: ColdTier, *, batch: int, threads: int,
                 protected: Callable[[BlockKey], bool],
                 on_commit: Callable[[list[WriteJob], list[BlockKey], BaseException | None], None],
                 tracer: trace.Tracer | None = None) -> None:
        self.cold = cold
        self._tracer = tracer or trace.get_tracer("kvtier.tiering")
        self.batch = batch
        self._protected = protected
        self._on_commit = on_commit
        self._queue: queue.Queue[WriteJob | None] = queue.Queue()
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="kvtier-compress")
        self._thread = threading.Thread(target=self._run, name="kvtier-cold-writer", daemon=True)
        self._closed = False
        self._thread.start()

    def submit(self, job: WriteJob) -> Future:
        """Queue ``job``; its future resolves (to the number of blocks written) once committed.

        :raises TierUnavailable: after :meth:`close`.
        """
        if self._closed:
            raise TierUnavailable("the cold writer is closed (the store is shutting down)")
        if job.trace_context is None:
            job.trace_context = trace.get_current_span().get_span_context()
        self._queue.put(job)
        return job.future

    def depth(self) -> int:
        """Jobs waiting (not counting the batch being written)."""
        return self._queue.qsize()

    def flush(self, timeout: float | None = None) -> None:
        """Block until every job submitted before this call is committed (or failed)."""
        if self._closed:
            return
        self.submit(WriteJob()).result(timeout)

    def close(self, timeout: float | None = 60.0) -> None:
        """Flush, then stop the thread. Idempotent."""
        if self._closed:
            return
        self.flush(timeout)
        self._closed = True
        self._queue.put(None)
        self._thread.join(timeout)
        self._pool.shutdown(wait=True)

    def _encode(self, item: tuple[BlockKey, Block]) -> ColdWrite:
        key, block = item
        raw = block.data if block.data.device.type == "cpu" else block.data.cpu()
        return ColdWrite(key, self.cold.encode(key, raw.numpy(), block.dtype, block.shape, block.checksum,
                                               lossy=block.cold_codec), block.ns_id)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs, n = [job], len(job.blocks)
            while n < self.batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)  # stop after this batch
                    break
                jobs.append(nxt)
                n += len(nxt.blocks)
            self._commit(jobs)

    def _start_span(self, jobs: list[WriteJob]) -> trace.Span:
        """The batch's ``kvtier.lmdb.commit`` span: a root linked to each distinct queuing request."""
        seen: dict[tuple[int, int], trace.SpanContext] = {}
        for j in jobs:
            ctx = j.trace_context
            if ctx is not None and ctx.is_valid:
                seen.setdefault((ctx.trace_id, ctx.span_id), ctx)
        links = [trace.Link(c) for c in list(seen.values())[:32]]
        # A root with links, not a child: the commit outlives the requests (a non-durable put has
        # answered already) and serves several of them; the attribute says so.
        return self._tracer.start_span("kvtier.lmdb.commit", context=trace.set_span_in_context(trace.INVALID_SPAN),
                                       links=links, attributes={"kvtier.outlives_rpc": True})

    def _commit(self, jobs: list[WriteJob]) -> None:
        """Commit ``jobs`` in one transaction; if that fails, commit each job in a transaction of its
        own, so a record that cannot be written (an over-long key, say) fails only the request that
        queued it and every other request of the batch is committed (in order)."""
        evicted, error = self._attempt(jobs)
        if error is not None and len(jobs) > 1:
            log.info("cold writer: a batch of %d jobs failed (%s); committing them one by one", len(jobs),
                     type(error).__name__)
            for j in jobs:
                self._settle([j], *self._attempt([j]))
            return
        self._settle(jobs, evicted, error)

    def _attempt(self, jobs: list[WriteJob]) -> tuple[list[BlockKey], BaseException | None]:
        """One transaction for ``jobs``: the keys it evicted and the error (None: committed)."""
        items = [b for j in jobs for b in j.blocks]
        sessions: dict[bytes, bytes | None] = {}
        namespaces: dict[bytes, bytes] = {}
        for j in jobs:
            sessions.update(j.sessions)
            namespaces.update(j.namespaces)
        error: BaseException | None = None
        evicted: list[BlockKey] = []
        span = self._start_span(jobs) if items or sessions or namespaces else None
        try:
            writes = list(self._pool.map(self._encode, items)) if len(items) > 1 else [self._encode(i) for i in items]
            at = 0
            for j in jobs:
                j.records = [w.record for w in writes[at:at + len(j.blocks)]]
                j.record_bytes = sum(len(r) for r in j.records)
                at += len(j.blocks)
            if writes or sessions or namespaces:
                evicted = self.cold.write_batch(writes, sessions=sessions, namespaces=namespaces,
                                                protected=self._protected)
        except KVTierError as exc:
            error = exc
        except Exception as exc:  # an LMDB or disk error (MDB_BAD_VALSIZE…) must not kill the writer thread
            log.debug("cold writer: transaction failed", exc_info=True)  # the WARN line carries no traceback
            error = TierUnavailable(f"cold tier write failed: {type(exc).__name__}: {exc}")
        if span is not None:
            raw = sum(b.nbytes for _, b in items)
            enc = sum(j.record_bytes for j in jobs)
            span.set_attributes({"kvtier.tier": "cold", "kvtier.blocks": len(items), "kvtier.bytes": enc,
                                 "kvtier.sessions": len(sessions), "kvtier.evictions": len(evicted)})
            if enc and error is None:
                span.set_attribute("kvtier.compression_ratio", round(raw / enc, 3))
            if error is not None:
                span.set_status(trace.Status(trace.StatusCode.ERROR, type(error).__name__))
            span.end()
        return evicted, error

    def _settle(self, jobs: list[WriteJob], evicted: list[BlockKey], error: BaseException | None) -> None:
        """Tell the listener, then resolve the futures of one committed (or failed) transaction."""
        if error is not None:
            # WARN without a traceback, counts only (never keys): a non-durable put has returned
            # already, so this line and the ``background_write_failures`` counter are how it is seen.
            background = [j for j in jobs if j.acknowledged]
            log.warning("cold writer: a write of %d blocks and %d session records failed (%s); %d of its "
                        "requests were answered already: their blocks stay served from memory until evicted",
                        sum(len(j.blocks) for j in jobs), sum(len(j.sessions) for j in jobs), error,
                        len(background))
        try:
            self._on_commit(jobs, evicted, error)
        except Exception:  # pragma: no cover - defensive: never lose the futures
            log.exception("cold writer: commit callback failed")
        for j in jobs:
            if error is None:
                j.future.set_result(len(j.blocks))
            else:
                j.future.set_exception(error if isinstance(error, KVTierError) else CapacityExceeded(str(error)))
