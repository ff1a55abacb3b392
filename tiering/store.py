"""TieredStore: the engine's facade: places, finds, moves and forgets KV blocks across its tier list.

Imports every collaborator below. Placement: a put lands in the highest cache (hot if there is a GPU,
else warm); a cache that runs out of room demotes its least valuable unpinned blocks (its policy
decides) one tier down; blocks leaving the last cache are dropped (``write_through``: they are on disk
already) or queued for disk (``write_back``). A read that hits a lower tier promotes the block to the
top cache. Either way a put may be *durable*: it returns only once its blocks and its session are
committed to LMDB.

The store is a small facade over ONE ordered tier list (``tiering/tierlist.py``, where the way a new
tier plugs in is described) and collaborators, each in its own file with its own state:
:class:`~tiering.placement.Placement` (insert, demote, promote), :class:`~tiering.loader.Loader`
(single-flight loads, tombstones, the read-ahead window, erases), :class:`~tiering.ingest.Ingest`
(puts), :class:`~tiering.session_records.SessionRecords`, :class:`~tiering.retention.Retention` (shared
blocks, priorities), :class:`~tiering.namespaces.NamespaceRegistry`
and :class:`~tiering.copyout.CopyOuts`. It never asks what kind a tier is.

Concurrency. One re-entrant lock (shared with the collaborators, passed to them) guards the caches,
the policies, stats, tombstones and the single-flight table; it is never held across LMDB I/O,
decompression or a host→device copy. Reads and prefetches pin their blocks with expiring leases.

Copies per block: put → top tier 1; to disk 2 (shuffle, compress); top-tier hit 0; warm → hot 1;
cold → top tier 3 (LMDB read, decompress+unshuffle, stage onto the tier's device).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from opentelemetry import trace

from .config import StoreConfig
from .copyout import CopyOut, CopyOuts
from .crypto import RecordSealer
from .datadir import lock_data_dir
from .errors import InvalidBlock, SessionNotFound, TierUnavailable
from .fleet import Fleet
from .ingest import Ingest, Payload
from .inventory import Inventory
from .keys import BlockKey, Namespace
from .leases import LeaseTable
from .loader import Loader
from .maintenance import Maintenance
from .namespaces import NamespaceRegistry
from .placement import Placement
from .retention import Retention
from .scatter import KVDest
from .results import LookupResult, PrefetchHandle, PutResult
from .session_records import SessionRecords
from .sessions import Session, session_id_key
from .spans import session_hash
from .stats import StoreStats
from .tier import Block, Tier
from .hostpool import HostPool
from .tierlist import TierList, build_tiers
from .tombstones import Tombstones

log = logging.getLogger(__name__)

__all__ = ["CopyOut", "LookupResult", "Payload", "PrefetchHandle", "PutResult", "TieredStore"]


class TieredStore:
    """The engine: see the module docstring. Thread-safe; blocking (run it off an event loop).

    :param config: capacities, policies, paths.
    :param tracer: OpenTelemetry tracer for tier spans (a no-op tracer when omitted).
    :param sealer: encrypt cold records at rest (``tiering/crypto.py``); required to open a store
        that was written encrypted.
    :raises TierUnavailable: if the data directory is unusable or used by another process, or its
        encryption key is missing or wrong (see :class:`~tiering.cold.ColdTier`).
    :raises ValueError: on an invalid config.
    """

    def __init__(self, config: StoreConfig | None = None, *, tracer: trace.Tracer | None = None,
                 sealer: RecordSealer | None = None) -> None:
        self.config = (config or StoreConfig()).validate()
        self.tracer = tracer or trace.get_tracer("kvtier.tiering")
        #: metrics hook: called ``on_timing("prefetch"|"resume", seconds)`` when a prefetch or a resume's
        #: prefetch finishes (set by ``service.metrics``; must not block).
        self.on_timing = None
        self.stats = StoreStats()
        self.leases = LeaseTable()
        self._lock = threading.RLock()
        self._closed = False
        self._lockfile = lock_data_dir(self.config.data_dir) if self.config.cold_enabled else None
        try:
            self.tiers: TierList = build_tiers(self.config, protected=self.leases.is_pinned, tracer=self.tracer,
                                               sealer=sealer)
        except BaseException:
            if self._lockfile is not None:
                self._lockfile.close()  # else the lock outlives the failed open, until GC
            raise
        self._compose()

    def _compose(self) -> None:
        cfg, lock, durable = self.config, self._lock, self.tiers.durable
        for name in self.tiers.names():
            self.stats.tier(name)
        if durable is not None:  # damaged records dropped by startup verification (config.verify_on_start)
            self.stats.tier(durable.name).checksum_failures += durable.checksum_failures
        tombstones = Tombstones()  # erased blocks no earlier read may put back (tiering/tombstones.py)
        self.namespaces = NamespaceRegistry(durable.namespaces() if durable is not None else None)
        self.session_records = SessionRecords(durable)
        self.fleet = Fleet(self.tiers, self.namespaces)  # what is shared with other hosts (tiering/fleet.py)
        self.inventory = Inventory(self.tiers, lock, namespaces=self.namespaces, fleet=self.fleet, tracer=self.tracer)
        if durable is not None:
            durable.on_commit(self.session_records.committed)
            durable.on_commit(self._count_commit)
        # Block loads (LMDB read, decode, staging) run on the fetch pool, which copy-out's decoding shares.
        fetch_threads = max(2, cfg.prefetch_threads * 2)
        self._pool = ThreadPoolExecutor(fetch_threads, thread_name_prefix="kvtier-fetch")
        shared = dict(lock=lock, stats=self.stats, tombstones=tombstones)
        self.placement = Placement(self.tiers, leases=self.leases, write_back=cfg.write_policy == "write_back",
                                   **shared)
        self.loader = Loader(self.tiers, self.placement, pool=self._pool, tracer=self.tracer, leases=self.leases,
                             config=cfg, **shared)
        self.copyouts = CopyOuts(self.tiers, self.placement, leases=self.leases, pool=self._pool,
                                 pool_threads=fetch_threads, tracer=self.tracer, lease_s=cfg.lease_s, **shared)
        self.retention = Retention(self.tiers.caches, self.session_records.all, self.loader.erase, lock)
        self.hostpool = HostPool.for_warm(next((t for t in self.tiers.caches if t.name == "warm"), None), cfg)
        self.ingest = Ingest(cfg, self.tiers, self.placement, lock=lock, stats=self.stats,
                             sessions=self.session_records, namespaces=self.namespaces, tracer=self.tracer,
                             priorities=self.retention.priorities, after_durable=self.fleet.durable_put,
                             alloc=self.hostpool.take)
        self._maint = Maintenance(self.leases, self.expire_sessions, self.config.maintenance_s)
        log.info("tiered store open: tiers %s, data dir %s, write policy %s",
                 ", ".join(f"{t.name}={t.device or 'disk'}:{t.capacity_bytes}B" for t in self.tiers.all),
                 cfg.data_dir, cfg.write_policy)

    def _count_commit(self, jobs, evicted: list[BlockKey], error: BaseException | None) -> None:
        """Durable tier commit listener: write counters (on the writer thread)."""
        with self._lock:
            self.stats.count_commit(self.tiers.durable.name, jobs, evicted, error)

    # -- lifecycle and shape -------------------------------------------------------------------------------
    def flush(self, timeout: float | None = None) -> None:
        """Wait until every block and session queued for the cold tier so far is committed."""
        if self.tiers.durable is not None:
            self.tiers.durable.flush(timeout)

    def close(self) -> None:
        """Write what only memory holds (``write_back``), flush the write queue to disk, stop background
        threads, close the tiers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._maint.stop()
        self.loader.close()
        self._pool.shutdown(wait=True)
        self.hostpool.close()
        self.placement.write_back_memory()
        self.tiers.close()
        if self._lockfile is not None:
            self._lockfile.close()
        log.info("tiered store closed")

    def __enter__(self) -> "TieredStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise TierUnavailable("the store is closed")

    def tier_names(self) -> list[str]:
        return self.tiers.names()

    @property
    def top_tier(self) -> str:
        return self.tier_names()[0]

    @property
    def memory(self) -> list[Tier]:
        """The cache tiers, top first (hot, warm: each has ``name`` and ``device``)."""
        return self.tiers.caches

    # -- blocks in ------------------------------------------------------------------------------------------
    def put(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray, blocks: Sequence[Payload], *,
            first_block: int = 0, session_id: str | None = None, durable: bool = False, priority: int = 0,
            ttl_s: float | None = None, checksums: Sequence[int | None] | None = None,
            owned: bool = False) -> PutResult:
        """Store the KV blocks of ``token_ids`` (and, with ``session_id``, the session's chain); every
        parameter, the result and the errors are :meth:`Ingest.put <tiering.ingest.Ingest.put>`'s.
        :raises TierUnavailable: also if the store is closed."""
        self._check_open()
        return self.ingest.put(namespace, token_ids, blocks, first_block=first_block, session_id=session_id,
                               durable=durable, priority=priority, ttl_s=ttl_s, checksums=checksums, owned=owned)

    # -- blocks out -----------------------------------------------------------------------------------------
    def get(self, key: BlockKey, *, promote: bool = True) -> tuple[Block, str] | None:
        """The block and the tier it was served from, or ``None`` if no tier has it.

        A hit below the top tier promotes the block to the top tier (unless ``promote`` is False).
        Concurrent loads of one block from disk happen once. Bytes that fail their checksum are
        never returned (the block becomes a miss and is dropped). Under a recording span, the tier
        work becomes one ``kvtier.<tier>.read`` span per tier (see :mod:`tiering.spans`).
        """
        self._check_open()
        return self.loader.get(key, promote=promote)

    def iter_blocks(self, keys: Sequence[BlockKey], *, window: int = 4,
                    deadline: float | None = None) -> Iterator[tuple[BlockKey, Block | None, str]]:
        """Yield ``(key, block, tier)`` in prefix order, stopping after the first miss (block None):
        :meth:`Loader.iter_blocks <tiering.loader.Loader.iter_blocks>` (read-ahead of ``window``
        blocks, keys pinned meanwhile, stops at ``deadline``). :raises TierUnavailable: if closed."""
        self._check_open()
        return self.loader.iter_blocks(keys, window=window, deadline=deadline)

    def read_resident(self, keys: Sequence[BlockKey], start: int, accept: Callable[[Block], bool]
                      ) -> tuple[list[Block], str, Callable[[], None]] | None:
        """The blocks of ``keys[start:]`` and their tier if every key is in host memory at the top and the store is free
        right now, else ``None`` with nothing changed: :meth:`Loader.read_resident
        <tiering.loader.Loader.read_resident>`. Never waits. :raises TierUnavailable: if closed."""
        self._check_open()
        return self.loader.read_resident(keys, start, accept)

    def copy_out(self, keys: Sequence[BlockKey], region: np.ndarray, **options) -> CopyOut:
        """:meth:`CopyOuts.copy_out <tiering.copyout.CopyOuts.copy_out>`. :raises TierUnavailable: if closed."""
        self._check_open()
        return self.copyouts.copy_out(keys, region, **options)

    def scatter_out(self, keys: Sequence[BlockKey], dest: KVDest, **options) -> CopyOut:
        """:meth:`CopyOuts.scatter_out <tiering.copyout.CopyOuts.scatter_out>` (into a layer-major KV
        destination). :raises TierUnavailable: if closed."""
        self._check_open()
        return self.copyouts.scatter_out(keys, dest, **options)

    def prefetch(self, keys: Sequence[BlockKey], *, deadline: float | None = None) -> PrefetchHandle:
        """Start moving ``keys`` up to the top tier, in order, and return at once: :meth:`Loader.prefetch
        <tiering.loader.Loader.prefetch>` (pins until the end plus ``lease_s``, or ``deadline``).
        ``on_timing("prefetch", seconds)`` is called when it ends. :raises TierUnavailable: if closed."""
        self._check_open()
        t0 = time.monotonic()
        return self.loader.prefetch(keys, deadline=deadline, closed=lambda: self._closed,
                                    on_done=lambda: self._report_timing("prefetch", t0))

    def _report_timing(self, what: str, t0: float) -> None:
        try:  # a metrics hook must never break a prefetch
            if self.on_timing is not None:
                self.on_timing(what, time.monotonic() - t0)
        except Exception:
            log.debug("timing hook failed", exc_info=True)

    # -- where things are (no data movement, no recency change) -----------------------------------------------
    def where(self, key: BlockKey) -> str | None:
        """The highest tier holding ``key`` now (no data movement, no recency change)."""
        return self.inventory.where([key])[0]

    def lookup(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray | None = None, *,
               keys: Sequence[BlockKey] | None = None, exact_only: bool = False) -> LookupResult:
        """The longest cached prefix of ``token_ids`` (or of ``keys``) and the tier of each block.

        Moves no data and changes no recency. A partial last block counts its own tokens only.
        ``remote_tokens``: those only the shared tier holds (:meth:`Fleet.found <tiering.fleet.Fleet.found>`).
        ``lossy``: per block, whether it reads approximate (``TierList.lossy``); ``exact_only`` stops before one.

        :raises InvalidBlock: with neither token ids nor keys.
        """
        self._check_open()
        return self.inventory.lookup(namespace, token_ids, keys, exact_only)

    def namespace_of(self, ns_id: bytes) -> Namespace | None:
        """The namespace registered under ``ns_id`` (a :attr:`Block.ns_id`), or ``None`` if unknown.

        Lets the service check that a block requested by key belongs to the caller's tenant.
        """
        return self.namespaces.get(ns_id)

    def owned(self, keys: Sequence[BlockKey], tenant: str) -> list[bool]:
        """Whether each key is held (anywhere) for a namespace of ``tenant``: False for a block of
        another tenant and for an absent one alike. Reads namespace ids only; moves no data and
        changes no recency, so a caller can drop foreign keys before any load or promotion."""
        return self.inventory.owned(keys, tenant)

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """Bytes ``tenant`` holds per usage group: ``memory`` (hot + warm, as their ``used_bytes``
        count) and ``cold`` (committed record footprints; blocks still queued are not counted yet)."""
        return self.inventory.tenant_usage(tenant)

    def shed(self, tenant: str, nbytes: int) -> int:
        """Free up to ``nbytes`` of memory from ``tenant``'s own least valuable unpinned blocks (to disk in
        write-back, dropped in write-through): :meth:`Placement.shed`. :returns: bytes freed."""
        return self.placement.shed(self.namespaces.ids(tenant), nbytes)

    # -- sessions ---------------------------------------------------------------------------------------------
    def get_session(self, tenant: str, session_id: str) -> Session:
        """The session's record (the shared tier's when newer: :meth:`Fleet.session <tiering.fleet.Fleet.session>`).

        :raises SessionNotFound: if there is none for this tenant, or it expired.
        """
        self._check_open()
        sid = session_id_key(tenant, session_id)
        trace.get_current_span().set_attribute("kvtier.session", session_hash(sid))
        session = self.fleet.session(sid, self.session_records.load(sid))
        if session is None or session.expired():
            raise SessionNotFound(f"no session {session_id!r} for this tenant (never stored, deleted or expired)")
        return session

    def session_count(self, tenant: str) -> int:
        """Sessions of ``tenant``, expired ones included until swept (O(the tenant's sessions))."""
        return self.session_records.count(tenant)

    def sessions(self) -> list[Session]:
        """Every session record (expired ones included until the sweeper removes them)."""
        return self.session_records.all()

    def resume(self, tenant: str, session_id: str, *, deadline: float | None = None
               ) -> tuple[Session, list[str | None], PrefetchHandle]:
        """Start bringing a session's blocks up to the top tier; return its manifest at once.

        :returns: the session, the tier of each of its blocks *before* the prefetch (None: gone),
            and the running prefetch.
        :raises SessionNotFound: see :meth:`get_session`.
        """
        t0 = time.monotonic()
        session = self.get_session(tenant, session_id)
        tiers = self.inventory.where(session.keys)
        handle = self.prefetch(session.keys, deadline=deadline)
        handle.future.add_done_callback(lambda _f: self._report_timing("resume", t0))

        def touch(current: Session | None) -> Session | None:
            # Touch the record as it is *now*: a put that extended the session since we read it
            # must not be overwritten by our older copy.
            if current is None or current.keys != session.keys:
                return None
            current.last_used = time.time()
            return current

        self.session_records.update(session.id_key, touch)
        return session, tiers, handle

    def delete_session(self, tenant: str, session_id: str, *, erase_blocks: bool = False) -> int:
        """Forget a session; with ``erase_blocks`` also delete from every tier the blocks no other live
        session names (:class:`~tiering.retention.Retention`: shared blocks stay).

        :returns: blocks erased.
        :raises SessionNotFound: if there is no such session. :raises TierUnavailable: if the shared tier
            (which loses its copies too) cannot be reached; the local copies are gone.
        """
        session = self.get_session(tenant, session_id)
        erased = self.retention.erase_exclusive([session]) if erase_blocks else 0
        self._forget_sessions([session])
        return erased

    def _forget_sessions(self, sessions: list[Session], shared: bool = True) -> None:
        """Delete these session records (and the shared tier's, with ``shared``), waiting until committed."""
        fut = self.session_records.submit({s.id_key: None for s in sessions})
        if fut is not None:
            fut.result()
        self.fleet.forget_sessions([s.id_key for s in sessions] if shared else [])

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
            ns_ids = self.namespaces.ids(tenant, model, revision)
        else:
            raise InvalidBlock("invalidate needs a namespace or a model", field="model")
        n = self.loader.erase_namespaces(ns_ids)
        dead = [s for s in self.sessions() if s.namespace.ns_id in ns_ids]
        if dead:
            self._forget_sessions(dead)
        log.info("invalidated %d blocks and %d sessions in %d namespaces", n, len(dead), len(ns_ids))
        return n

    def expire_sessions(self) -> int:
        """Delete sessions whose TTL has passed, with the blocks no live session references (a block
        shared with an unexpired session outlives the expired one). Returns how many expired."""
        now = time.time()
        dead = [s for s in self.sessions() if s.expired(now)]
        if dead:
            # Not delete_session: get_session treats an expired session as absent, so it would
            # raise SessionNotFound and the session and its blocks would stay forever. The shared
            # tier keeps its copies: another host may still use them, and they have their own TTL.
            self.retention.erase_exclusive(dead, shared=False)
            self._forget_sessions(dead, shared=False)
        return len(dead)

    # -- stats ------------------------------------------------------------------------------------------------
    def usage(self) -> dict[str, dict[str, int]]:
        """Per tier: blocks, used bytes, capacity bytes."""
        return self.inventory.usage()

    def snapshot(self) -> dict:
        """Counters, usage, pins and queue depths in one dict (for the Stats RPC and metrics)."""
        with self._lock:
            snap = self.stats.snapshot()
        durable = self.tiers.durable
        queued, jobs = durable.queue_depth() if durable is not None else (0, 0)
        raw, rec = snap["cold_raw_bytes_written"], snap["cold_record_bytes_written"]
        snap.update(pending_writes=queued, inflight_loads=self.loader.inflight(), usage=self.usage(),
                    pinned_blocks=self.leases.pinned_keys(), active_leases=self.leases.active(),
                    write_queue_depth=jobs, compression_ratio=raw / rec if rec else None)
        snap.update(self.fleet.snapshot())
        snap.update(self.hostpool.stats())
        return snap

    def check(self) -> list[str]:
        """Verify internal invariants (accounting matches contents, used <= capacity, for every tier
        the cold one included: O(blocks)); returns problems found, [] if none."""
        return [p for t, found in self.tiers.each(self._lock, lambda t: t.check())
                for p in (found if found is not None else [f"{t.name}: unavailable"])]
