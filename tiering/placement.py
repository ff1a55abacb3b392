"""Placement: where a block goes in the tier list: insert, demote, promote. Imports ``tier``, ``spans``,
``writer`` (the job type).

A put or a promotion inserts into the first cache (from ``start`` down) that can make room; a cache
that needs room asks its policy for victims (:meth:`~tiering.tier.Tier.victims`: pinned keys are
never victims; all or nothing) and demotes them to the next cache. Victims of the last cache go to the
durable tier in ``write_back`` (they are not on disk yet) and are dropped in ``write_through`` (they
are). Tiers below the durable one are never written here.

Thread-safety: every method takes the store's ``lock`` around the caches (shared with the loader and
copy-out); bytes are staged onto a cache's device before the lock is taken.
"""

from __future__ import annotations

import logging
import threading

from .keys import BlockKey
from .leases import LeaseTable
from .spans import TierOps, now_ns
from .stats import StoreStats
from .tier import Block
from .tierlist import TierList
from .tombstones import Tombstones
from .writer import WriteJob

log = logging.getLogger(__name__)

#: :meth:`Placement.place` of a put's block found the key held by a cache already (first writer wins)
HELD = -2


class Placement:
    """Insert, demote and promote over the caches of ``tiers``.

    :param tiers: the store's tier list. :param lock: the store's lock (guards caches, stats, tombstones).
    :param leases: pins: a pinned block is never a victim. :param stats: counters to bump.
    :param tombstones: erases in progress: a read's promotion never puts an erased block back.
    :param write_back: demote the last cache's victims to the durable tier (else drop them).
    """

    def __init__(self, tiers: TierList, *, lock: threading.RLock, leases: LeaseTable, stats: StoreStats,
                 tombstones: Tombstones, write_back: bool) -> None:
        self.tiers = tiers
        self.lock = lock
        self.leases = leases
        self.stats = stats
        self.tombstones = tombstones
        self.write_back = write_back

    def place(self, key: BlockKey, block: Block, start: int = 0, since: int | None = None, *,
              new: bool = False) -> int:
        """Put ``block`` into the first cache from ``start`` down that can make room.

        :param since: for a read's promotion, the tombstone generation the read began at: a block
            erased since is not put back (:mod:`tiering.tombstones`).
        :param new: a put's block: if a cache holds the key already (another writer placed it since the
            put looked), keep that block and return :data:`HELD` (first writer wins), checked under the
            lock together with the insert.
        :returns: the index of the cache that took it, :data:`HELD`, or -1 when none could (everything
            pinned, no cache, or the block was erased meanwhile).
        """
        caches = self.tiers.caches
        for i in range(start, len(caches)):
            staged = caches[i].stage(block, copy=False)  # the store's own bytes, or a lower tier's
            with self.lock:
                if self.tombstones.refuses(since, key, block.ns_id):
                    return -1
                if new and self.held(key) is not None:
                    return HELD
                if self._insert(i, key, staged):
                    return i
        return -1

    def _insert(self, i: int, key: BlockKey, block: Block) -> bool:
        """Insert into cache ``i``, demoting victims. Caller holds the lock and staged the bytes."""
        tier = self.tiers.caches[i]
        if tier.contains(key):
            tier.get(key)  # an access: the policy learns the block is wanted
            return True
        self.leases.sweep()
        victims = tier.victims(block.nbytes, self.leases.is_pinned)
        if victims is None:
            return False
        for v, old in tier.evict(victims):
            self._demote(i, v, old)
        tier.put(key, block)
        return True

    def _demote(self, i: int, key: BlockKey, block: Block) -> None:
        """Move a victim of cache ``i`` one level down (caller holds the lock)."""
        caches = self.tiers.caches
        src = self.stats.tier(caches[i].name)
        # A demotion is counted only when a copy is made below now (the next cache, or the cold
        # writer's queue in write-back); a block dropped (on disk already, or nowhere to go) is an eviction.
        if i + 1 < len(caches):
            dst = caches[i + 1]
            held = dst.contains(key)
            if self._insert(i + 1, key, block if held else dst.stage(block)):
                if held:
                    src.evictions += 1  # the next cache had it already: nothing was copied
                else:
                    src.demotions += 1
                    self.stats.bytes_moved[f"{caches[i].name}->{dst.name}"] += block.nbytes
                return
        self._leave_memory(caches[i].name, key, block)

    def _leave_memory(self, name: str, key: BlockKey, block: Block) -> None:
        """A block left the caches from cache ``name``: queued for the durable tier in write-back (a
        demotion), else dropped (an eviction: on disk already). Caller holds the lock."""
        durable = self.tiers.durable
        if self.write_back and durable is not None and durable.enqueue(key, block):
            self.stats.tier(name).demotions += 1
            self.stats.bytes_moved[f"{name}->{durable.name}"] += block.nbytes
        else:
            self.stats.tier(name).evictions += 1

    def shed(self, ns_ids: set[bytes], nbytes: int) -> int:
        """Free up to ``nbytes`` of memory from the blocks of ``ns_ids`` only (one tenant's): their least
        valuable unpinned blocks (each cache's policy order, the last cache first) leave the caches as
        its victims would (queued for disk in write-back, dropped in write-through).

        :returns: bytes freed; less than ``nbytes`` when the rest is pinned or not theirs.
        """
        freed = 0
        with self.lock:
            self.leases.sweep()
            for tier in reversed(self.tiers.caches):
                chosen = []
                for key in tier.policy.iter_order():
                    if freed >= nbytes:
                        break
                    if tier.ns_of(key) in ns_ids and not self.leases.is_pinned(key):
                        chosen.append(key)
                        freed += tier.peek(key).nbytes
                for key, block in tier.evict(chosen):
                    self._leave_memory(tier.name, key, block)
        return freed

    def promote(self, key: BlockKey, block: Block, src: str, ops: TierOps | None = None,
                since: int | None = None) -> Block:
        """Put ``block`` (read from tier ``src``) into the top cache that takes it; a read that began
        at tombstone generation ``since`` never puts back a block erased since. Returns the block as
        the cache holds it (or ``block`` when none took it)."""
        t0 = now_ns() if ops is not None else 0
        placed = self.place(key, block, 0, since)
        if placed < 0:
            return block
        dst = self.tiers.caches[placed]
        if ops is not None:
            t1 = now_ns()
            ops.record("promote", t0, t1, nbytes=block.nbytes, to_tier=dst.name)
            if dst.device is not None and dst.device.type == "cuda" and block.data.device.type != "cuda":
                ops.record("h2d_copy", t0, t1, nbytes=block.nbytes, to_tier=dst.name)
        with self.lock:
            if dst.name != src:
                self.stats.tier(dst.name).promotions += 1
                self.stats.bytes_moved[f"{src}->{dst.name}"] += block.nbytes
            return dst.peek(key) or block

    def held(self, key: BlockKey) -> Block | None:
        """The block a cache holds for ``key`` (a peek: no recency change), or ``None``. Takes the lock."""
        with self.lock:
            return next((t.peek(key) for t in self.tiers.caches if t.contains(key)), None)

    def held_only_in_caches(self, keys: list[BlockKey]) -> list[tuple[BlockKey, Block]]:
        """Of ``keys``, the blocks held by a cache and not by the durable tier (nor queued for it):
        what a durable put must still write."""
        keys = list(dict.fromkeys(keys))
        durable = self.tiers.durable
        on_disk = durable.contains_many(keys) if durable is not None else [False] * len(keys)
        out = []
        with self.lock:
            for key, here in zip(keys, on_disk):
                if here:
                    continue
                block = next((t.peek(key) for t in self.tiers.caches if t.contains(key)), None)
                if block is not None:
                    out.append((key, block))
        return out

    def write_back_memory(self) -> None:
        """In ``write_back``, commit the blocks held only by the caches (never demoted yet) and wait: a
        clean close loses nothing. A failure is counted and logged by the writer like any failed
        background write (``background_write_failures``)."""
        durable = self.tiers.durable
        if not self.write_back or durable is None:
            return
        with self.lock:
            keys = [k for t in self.tiers.caches for k in t.keys()]
        blocks = self.held_only_in_caches(keys)
        if blocks:
            try:
                durable.submit(WriteJob(blocks=blocks, acknowledged=True)).result()
            except Exception as exc:  # already counted and logged at WARN by the writer
                log.debug("write-back of %d memory blocks failed: %s", len(blocks), exc)
