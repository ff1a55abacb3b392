"""Loader: reads blocks through the tier list: single-flight loads, one read-ahead window, erases.

Imports ``tierlist``, ``placement``, ``spans``, ``tombstones`` and ``errors``. A read walks the fast
tiers under the store's lock, then the slow ones (durable, then below) outside it, where concurrent
reads of one key share one load (single-flight). A hit below the top cache is promoted through
:class:`~tiering.placement.Placement`. Erases mark tombstones first, so no read that began before an
erase puts the erased block back (:mod:`tiering.tombstones`). :meth:`read_ahead` is the one window loop
behind :meth:`iter_blocks` and :meth:`prefetch`.

Thread-safety: any thread; the lock (the store's) guards the in-flight table, tombstones and stats.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

from opentelemetry import context as otel_context

from .config import StoreConfig
from .keys import BlockKey
from .leases import LeaseTable
from .placement import Placement
from .results import PrefetchHandle
from .spans import TierOps, now_ns
from .stats import StoreStats
from .tier import Block
from .tierlist import TierList
from .tombstones import Tombstones

log = logging.getLogger(__name__)
T = TypeVar("T")


class Loader:
    """Reads and erases over ``tiers``.

    :param placement: promotes hits. :param lock: the store's lock. :param stats: counters to bump.
    :param tombstones: shared with placement. :param pool: the fetch threads (read-ahead loads).
    :param tracer: for the spans of :meth:`get`.
    """

    def __init__(self, tiers: TierList, placement: Placement, *, lock: threading.RLock, stats: StoreStats,
                 tombstones: Tombstones, pool: ThreadPoolExecutor, tracer, leases: LeaseTable,
                 config: StoreConfig) -> None:
        self.tiers = tiers
        self.placement = placement
        self.lock = lock
        self.stats = stats
        self.tombstones = tombstones
        self.pool = pool
        self.tracer = tracer
        self.leases = leases
        self.lease_s = config.lease_s
        self.prefetch_window = max(2, config.prefetch_threads * 2)
        self._inflight: dict[BlockKey, Future] = {}
        # prefetch coordinators have their own pool, so that a coordinator waiting for loads can never
        # starve the loads it waits for (those run on ``pool``)
        self._coordinators = ThreadPoolExecutor(config.prefetch_threads, thread_name_prefix="kvtier-prefetch")

    def close(self) -> None:
        """Wait for the running prefetches to end (the fetch pool is the caller's)."""
        self._coordinators.shutdown(wait=True)

    def inflight(self) -> int:
        """Loads from slow tiers running now."""
        with self.lock:
            return len(self._inflight)

    # -- one block --------------------------------------------------------------------------------------
    def get(self, key: BlockKey, *, promote: bool = True) -> tuple[Block, str] | None:
        """The block and the tier it was served from, or ``None`` if no tier has it (see
        :meth:`~tiering.store.TieredStore.get`). Tier work becomes spans under a recording span."""
        ops = TierOps.under_current_span(self.tracer)
        try:
            return self.load(key, promote, ops)
        finally:
            if ops is not None:
                ops.finish()

    def load(self, key: BlockKey, promote: bool, ops: TierOps | None) -> tuple[Block, str] | None:
        """:meth:`get`, recording its tier work into ``ops`` (when not None)."""
        with self.lock:
            since = self.tombstones.begin_read()
        try:
            return self._load_since(key, promote, ops, since)
        finally:
            with self.lock:
                self.tombstones.end_read(since)

    def _load_since(self, key: BlockKey, promote: bool, ops: TierOps | None, since: int) -> tuple[Block, str] | None:
        owner = False
        block, hit, fut = None, None, None
        t0 = now_ns() if ops is not None else 0
        with self.lock:
            missed = []
            for tier in self.tiers.fast:
                block = tier.get(key)
                if block is not None:
                    self.stats.tier(tier.name).hits += 1
                    hit = tier
                    break
                self.stats.tier(tier.name).misses += 1
                missed.append(tier)
            if block is None:
                fut = self._inflight.get(key)
                if fut is None and self.tiers.slow:
                    fut = self._inflight[key] = Future()
                    owner = True
        if ops is not None:
            t1 = now_ns()
            for tier in missed:
                ops.record(f"{tier.name}.read", t0, t1, hit=False)
            if hit is not None:
                ops.record(f"{hit.name}.read", t0, t1, nbytes=block.nbytes)
        if hit is not None:
            caches = self.tiers.caches
            if promote and caches and hit is not caches[0]:
                self.placement.promote(key, block, hit.name, ops, since)
            return block, hit.name
        if fut is None:
            return None
        if not owner:
            return fut.result()
        try:
            got = self._load_slow(key, promote, ops, since)
            fut.set_result(got)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self.lock:
                if self._inflight.get(key) is fut:  # an erase may have let a newer load take the key
                    del self._inflight[key]
        return got

    def _load_slow(self, key: BlockKey, promote: bool, ops: TierOps | None, since: int) -> tuple[Block, str] | None:
        """Ask the slow tiers in order; a tier below the durable one that is unavailable is a miss."""
        for tier in self.tiers.slow:
            before = tier.checksum_failures
            got = self.tiers.guarded(tier, lambda: tier.read(key, ops), None)
            with self.lock:
                self.stats.tier(tier.name).checksum_failures += tier.checksum_failures - before
                if got is None:
                    self.stats.tier(tier.name).misses += 1
                    continue
                if got[1] == tier.name:
                    self.stats.tier(tier.name).hits += 1
            block, where = got
            if promote:
                block = self.placement.promote(key, block, where, ops, since)
            return block, where
        return None

    # -- many blocks ------------------------------------------------------------------------------------
    def read_ahead(self, keys: Sequence[BlockKey], load: Callable[[BlockKey], T], *, window: int,
                   inline: bool, stop: Callable[[], bool]) -> Iterator[tuple[BlockKey, T]]:
        """Yield ``(key, load(key))`` in order, keeping up to ``window`` loads running ahead on the fetch
        threads, until the keys run out or ``stop()`` (checked before each wait) says so. Closing the
        iterator early cancels the loads not started yet.

        :param inline: a load no fetch thread has started yet (always so for the first key) is done on
            the calling thread instead of being waited for: one thread hand-off less per block.
        """
        futures: list[Future | None] = []
        nxt = 0
        try:
            for idx, key in enumerate(keys):
                if inline and nxt == idx:  # not handed out: this thread loads it below
                    futures.append(None)
                    nxt += 1
                while nxt < len(keys) and nxt < idx + window:
                    futures.append(self.pool.submit(load, keys[nxt]))
                    nxt += 1
                if stop():
                    return
                fut = futures[idx]
                # a queued fetch is taken back and done here rather than waited for (one hand-off less)
                yield key, (load(key) if fut is None or (inline and fut.cancel()) else fut.result())
        finally:
            for f in futures:
                if f is not None:
                    f.cancel()

    def iter_blocks(self, keys: Sequence[BlockKey], *, window: int = 4,
                    deadline: float | None = None) -> Iterator[tuple[BlockKey, Block | None, str]]:
        """Yield ``(key, block, tier)`` in prefix order, stopping after the first miss (block None).

        Up to ``window`` blocks are loaded ahead on the fetch threads, so disk reads and decompression
        overlap with the caller consuming earlier blocks. The keys are pinned for the duration.
        ``deadline`` is a ``time.monotonic()`` instant after which the iteration stops early.
        The block needed next is loaded on the calling thread when no fetch thread has started on it
        (always so for the first): a one-block iteration never waits on a thread hand-off.
        """
        keys = list(keys)
        lease = self.leases.acquire(keys, self.lease_s)
        with self.lock:
            self.stats.gets += 1
        ops = TierOps.under_current_span(self.tracer)
        loads = self.read_ahead(keys, lambda k: self.load(k, True, ops), window=window, inline=True,
                                stop=self.past(deadline))
        try:
            for key, got in loads:
                if got is None:
                    yield key, None, ""
                    return
                yield key, got[0], got[1]
        finally:
            loads.close()
            self.leases.release(lease)
            if ops is not None:
                ops.finish()

    def read_resident(self, keys: Sequence[BlockKey], start: int, accept: Callable[[Block], bool]
                      ) -> tuple[list[Block], str, Callable[[], None]] | None:
        """Blocks ``keys[start:]`` read without waiting on anything (for a caller on an event loop), when
        the store's lock is free right now and every key of ``keys`` is in the top cache, in host memory,
        with ``accept(block)`` true (asked of a peek, under the lock). Their reads count as
        :meth:`iter_blocks`' do (one get, an access and a hit each, a ``<tier>.read`` span under a
        recording span); the keys stay pinned until the returned ``release`` is called (or ``lease_s``).

        :returns: ``(blocks, the top cache's name, release)``, or ``None`` when anything is otherwise: then nothing was read,
            counted or pinned (:meth:`iter_blocks` is the way).
        """
        top = self.tiers.caches[0] if self.tiers.caches else None
        if top is None or top.device is None or top.device.type != "cpu":
            return None
        if not self.lock.acquire(blocking=False):  # another thread is in the store: not waiting for it
            return None
        try:
            t0 = now_ns()
            if not all((b := top.peek(k)) is not None and accept(b) for k in keys):
                return None
            blocks = [top.get(k) for k in keys[start:]]  # the accesses
            self.stats.gets += 1
            self.stats.tier(top.name).hits += len(blocks)
            lease = self.leases.acquire(keys[start:], self.lease_s)
        finally:
            self.lock.release()
        ops = TierOps.under_current_span(self.tracer)
        if ops is not None:
            ops.record(f"{top.name}.read", t0, now_ns(), nbytes=sum(b.nbytes for b in blocks))
            ops.finish()
        return blocks, top.name, lambda: self.leases.release(lease)

    def prefetch(self, keys: Sequence[BlockKey], *, deadline: float | None = None,
                 closed: Callable[[], bool] = lambda: False, on_done: Callable[[], None] | None = None
                 ) -> PrefetchHandle:
        """Start moving ``keys`` up to the top cache, in order, and return at once.

        The keys stay pinned until the prefetch ends plus ``lease_s`` (or until ``deadline``, a
        ``time.monotonic()`` instant, if that comes first), so the following get finds them. A get of
        a block still being loaded waits for that load instead of reading it twice.

        :param closed: stops the prefetch early when true (the store closing).
        :param on_done: called when it ends (must not raise).
        """
        keys = list(keys)
        # While running, the pins last until the deadline (or one lease_s); when the prefetch ends
        # they are renewed for lease_s from then, so the Get that follows finds its blocks.
        run_s = self.lease_s if deadline is None else max(0.0, min(self.lease_s, deadline - time.monotonic()))
        lease = self.leases.acquire(keys, run_s)
        with self.lock:
            self.stats.prefetches += 1
        ctx = otel_context.get_current()  # the caller's (the RPC's) context: the prefetch is its child
        fut = self._coordinators.submit(self._prefetch_run, keys, deadline, closed, ctx)

        def finished(_f: Future) -> None:
            self.leases.extend(lease, self.lease_s)
            if on_done is not None:
                on_done()

        fut.add_done_callback(finished)
        return PrefetchHandle(keys, fut, lease)

    def _prefetch_run(self, keys: list[BlockKey], deadline: float | None, closed: Callable[[], bool],
                      parent: otel_context.Context) -> int:
        """Coordinator of one prefetch: keeps a window of block loads in flight on the fetch pool, so
        LMDB reads, decompression and host→device copies of consecutive blocks overlap.

        Its ``kvtier.prefetch`` span is a child of the span that started it (``parent``, the caller's
        context: a Resume's tier reads are in the caller's trace) and says ``kvtier.outlives_rpc``: a
        prefetch goes on after a Resume or Prefetch RPC has answered."""
        past = self.past(deadline)
        with self.tracer.start_as_current_span("kvtier.prefetch", context=parent) as span:
            span.set_attributes({"kvtier.blocks_requested": len(keys), "kvtier.outlives_rpc": True})
            # one span per tier op for the whole prefetch, children of kvtier.prefetch
            ops = TierOps(self.tracer, span) if span.is_recording() else None
            loads = self.read_ahead(keys, lambda k: self.load_to_top(k, ops), window=self.prefetch_window,
                                    inline=False, stop=lambda: closed() or past())
            done = 0
            try:
                for _key, found in loads:
                    if not found:
                        break
                    done += 1
                else:
                    if done < len(keys):
                        span.set_attribute("kvtier.deadline_hit", True)
            finally:
                loads.close()
                if ops is not None:
                    ops.finish()
            span.set_attribute("kvtier.blocks", done)
            return done

    def past(self, deadline: float | None) -> Callable[[], bool]:
        """A ``stop`` for :meth:`read_ahead`: true once ``deadline`` (``time.monotonic()``) has passed."""
        return lambda: deadline is not None and time.monotonic() > deadline

    def load_to_top(self, key: BlockKey, ops: TierOps | None = None) -> bool:
        """Bring ``key`` into the top cache (a prefetch's step). Returns whether some tier had it."""
        caches = self.tiers.caches
        with self.lock:
            if caches and caches[0].contains(key):
                return True
        return self.load(key, True, ops) is not None

    # -- erases -----------------------------------------------------------------------------------------
    def erase(self, keys: Iterable[BlockKey], *, shared: bool = True) -> int:
        """Delete ``keys`` from every tier (the write queue included); returns how many were anywhere.
        Without ``shared`` the tier shared with other hosts keeps them (a local expiry)."""
        keys = set(keys)
        gone: set[BlockKey] = set()  # a block held by several tiers counts once
        with self.lock:
            # reads already running may hold these blocks: they must not put them back (tombstones)
            self.tombstones.begin_erase(keys)
            for k in keys:
                self._inflight.pop(k, None)  # a load begun before the erase is not shared with later reads
            for tier in self.tiers.fast:
                gone.update(tier.delete_many(keys))
        try:
            for tier in self.tiers.slow:
                if shared or tier is not self.tiers.shared:
                    gone.update(tier.delete_many(list(keys)))
        finally:
            with self.lock:
                self.tombstones.end_erase(keys)
        return len(gone)

    def erase_namespaces(self, ns_ids: set[bytes]) -> int:
        """Delete every block of these namespaces from every tier; returns how many were anywhere.
        A tier below the durable one that cannot list a namespace's keys (a shared cluster) is asked to
        delete every key of it any tier above knew as well."""
        gone: set[BlockKey] = set()
        known: dict[bytes, list[BlockKey]] = {ns_id: [] for ns_id in ns_ids}
        with self.lock:
            self.tombstones.begin_erase(ns_ids)  # running reads must not put them back
            for tier in self.tiers.fast:
                for ns_id in ns_ids:
                    keys = tier.keys_of_namespace(ns_id)
                    known[ns_id] += keys
                    gone.update(tier.delete_many(keys))
        marked: list[BlockKey] = []
        try:
            for tier in self.tiers.slow:
                for ns_id in ns_ids:
                    keys = tier.keys_of_namespace(ns_id)
                    if tier in self.tiers.below:
                        keys = list(dict.fromkeys([*known[ns_id], *keys]))
                    known[ns_id] += keys
                    with self.lock:  # by key too: a block loaded meanwhile may no longer know its namespace
                        self.tombstones.begin_erase(keys)
                        marked += keys
                    gone.update(tier.delete_many(keys))
        finally:
            with self.lock:
                self.tombstones.end_erase([*ns_ids, *marked])
        return len(gone)
