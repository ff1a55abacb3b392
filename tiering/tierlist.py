"""TierList: the store's tiers in one ordered list, top first, and how a new tier plugs in.

Imports ``tier`` and, in :func:`build_tiers` only, the tier modules and the config.

The list has three parts, and a tier's part is its role (the store never asks what kind a tier is):

``caches``   fast tiers (``slow = False``: reads are dict lookups made under the store's lock), top
             first: hot, warm. Puts are inserted into the first that takes them; a cache that needs
             room demotes its policy's victims to the next cache; reads below promote into them.
``durable``  at most one tier, the write target: write-through puts and write-back demotions are
             queued to it, durable puts wait for it, session and namespace records are kept in it. It
             must offer :class:`DurableTier`'s methods on top of :class:`~tiering.tier.Tier`. Today:
             :class:`~tiering.writebehind.WriteBehindTier` over the cold tier.
``below``    tiers under the durable one (e.g. a remote cache shared by several hosts), in order. They
             are never written by puts or demotions; a read that misses every tier above consults them
             in order (outside the lock, one load per key at a time) and promotes what it finds into
             the caches; erase and invalidate delete from them too. A failing one raises
             :class:`~tiering.errors.TierUnavailable`: a read, lookup or copy-out treats that as a
             miss, stats leave the tier out, but an erase or invalidation fails with it (after the
             local tiers are erased: an erase that could not reach every tier must not look done).
             Such a tier may fill itself from the durable tier's commits
             (``tiers.durable.on_commit(listener)``, called on the writer thread) and write asynchronously.

``shared``   at most one of the ``below`` tiers that other hosts share (the remote tier): it also keeps
             session records, takes the durable puts' blocks synchronously and is fed from the durable
             tier's commits (:class:`~tiering.fleet.Fleet` does both). Today:
             :class:`~tiering.remote.block_tier.RemoteBlockTier`, built when ``config.remote`` is set.

Adding a tier is one module (a :class:`~tiering.tier.Tier`; ``slow = True`` when its reads do I/O) plus
one entry in :func:`build_tiers`, e.g. ``below=[t for t in (make_remote_tier(config),) if t]``. Every
walk over the tiers (get, lookup, where, owned, copy-out, erase, usage, check, close) goes through
:attr:`TierList.all`, so nothing else changes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from typing import Protocol, TypeVar

from .errors import TierUnavailable
from .keys import BlockKey
from .tier import Tier

log = logging.getLogger(__name__)
T = TypeVar("T")


class DurableTier(Protocol):
    """What the ``durable`` slot needs beyond :class:`~tiering.tier.Tier` (records travel with blocks)."""

    name: str

    def submit(self, job) -> Future:
        """Queue a :class:`~tiering.writer.WriteJob` (blocks, session and namespace records); resolves on commit."""

    def enqueue(self, key: BlockKey, block) -> bool:
        """Queue one block unless already queued (a write-back demotion); returns whether it was queued."""

    def on_commit(self, listener: Callable) -> None:
        """Call ``listener(jobs, evicted, error)`` after every commit."""

    def record(self, key: BlockKey) -> bytes | None:
        """The committed record of ``key`` (the cold format), e.g. to copy it to a shared tier."""

    def session_get(self, sid: bytes) -> bytes | None: ...
    def session_items(self) -> list[tuple[bytes, bytes]]: ...
    def session_census(self, prefix: bytes, sids: list[bytes]) -> tuple[int, list[bool]]: ...
    def namespaces(self) -> dict[bytes, dict]: ...
    def queue_depth(self) -> tuple[int, int]: ...


class TierList:
    """The ordered tiers of one store (see the module docstring for the three parts).

    :raises ValueError: if there is no tier at all, or a cache is slow.
    """

    def __init__(self, caches: Iterable[Tier], durable: Tier | None = None, below: Iterable[Tier] = (),
                 shared: Tier | None = None) -> None:
        self.caches: list[Tier] = list(caches)
        self.durable = durable
        self.below: list[Tier] = list(below)
        #: the tier below shared with other hosts (one of ``below``), or None
        self.shared = shared
        if shared is not None and shared not in self.below:
            raise ValueError("the shared tier must be one of the tiers below the durable one")
        #: every tier, top first
        self.all: list[Tier] = [*self.caches, *([durable] if durable is not None else []), *self.below]
        if not self.all:
            raise ValueError("every tier is off: enable at least one of hot, warm or cold")
        if any(t.slow for t in self.caches):
            raise ValueError("a cache tier must be fast (slow = False): the store reads it under its lock")
        #: tiers read under the store's lock, and tiers read outside it (single-flight), top first
        self.fast: list[Tier] = [t for t in self.all if not t.slow]
        self.slow: list[Tier] = [t for t in self.all if t.slow]

    def walk(self, keys: list[BlockKey], lock, ask: Callable[[Tier, list[BlockKey]], list[T | None]]) -> list[T | None]:
        """For each key, the first non-``None`` answer of the tiers, top first: ``ask(tier, keys)``
        answers for the keys no tier above answered (a peek: ``locate``, ``ns_of``...). Fast tiers are
        asked under ``lock``, slow ones outside it; a tier below the durable one that is unavailable
        answers ``None``."""
        out: list[T | None] = [None] * len(keys)

        def fill(tier: Tier) -> None:
            todo = [i for i, v in enumerate(out) if v is None]
            if not todo:
                return
            answers = self.guarded(tier, lambda: ask(tier, [keys[i] for i in todo]), [None] * len(todo))
            for i, v in zip(todo, answers):
                out[i] = v

        with lock:
            for tier in self.fast:
                fill(tier)
        for tier in self.slow:
            fill(tier)
        return out

    def lossy(self, keys: Sequence[BlockKey], where: Sequence[str | None], lock) -> list[bool]:
        """For each key found in tier ``where[i]`` (as :meth:`walk` with ``locate`` names it), whether a read
        would serve approximate bytes *if its namespace has a lossy cold codec*: unless a fast tier holds
        its exact bytes (a durable tier, its write queue or the remote tier count as lossy). A peek."""
        fast = {t.name: t for t in self.fast}
        with lock:
            return [t not in fast or (b := fast[t].peek(k)) is None or b.lossy for k, t in zip(keys, where)]

    def each(self, lock, fn: Callable[[Tier], T]) -> list[tuple[Tier, T | None]]:
        """``(tier, fn(tier))`` for every tier: fast ones under ``lock``, slow ones outside it; ``None``
        for a tier below the durable one that is unavailable (stats must not fail with it)."""
        with lock:
            out = [(t, self.guarded(t, lambda: fn(t), None)) for t in self.fast]
        return out + [(t, self.guarded(t, lambda: fn(t), None)) for t in self.slow]

    def guarded(self, tier: Tier, call: Callable[[], T], miss: T) -> T:
        """``call()``, or ``miss`` when ``tier`` is below the durable one and raises
        :class:`~tiering.errors.TierUnavailable` (logged): a failing remote tier is a miss, not an error."""
        try:
            return call()
        except TierUnavailable as exc:
            if tier not in self.below:
                raise
            log.warning("tier %s unavailable, read as a miss: %s", tier.name, exc)
            return miss

    def names(self) -> list[str]:
        return [t.name for t in self.all]

    def close(self) -> None:
        """Close every tier, bottom first (the durable one commits its queue first)."""
        for t in reversed(self.all):
            t.close()


def build_tiers(config, *, protected: Callable[[BlockKey], bool], tracer, sealer=None) -> TierList:
    """The tiers a :class:`~tiering.config.StoreConfig` asks for: ``[hot?, warm?] + writebehind(cold)?
    + remote?`` (the remote tier, below and shared, when ``config.remote`` is set).

    :param protected: keys the durable tier must not evict (the store's pins).
    :raises TierUnavailable: if the cold tier cannot be opened. :raises ValueError: if every tier is off.
    """
    from .codec import Codec, CodecId
    from .cold import ColdTier
    from .hot import make_hot_tier
    from .warm import make_warm_tier
    from .writebehind import WriteBehindTier

    cfg = config
    codec = Codec(cfg.zstd_level, CodecId[cfg.codec.upper()])
    caches = [t for t in (make_hot_tier(cfg.hot_device, cfg.hot_capacity, cfg.policy),
                          make_warm_tier(cfg.warm_capacity, cfg.policy, cfg.warm_pin)) if t is not None]
    durable = None
    if cfg.cold_enabled:
        cold = ColdTier(os.path.join(cfg.data_dir, "cold"), cfg.cold_capacity, codec,
                        durable_sync=cfg.durable_sync, sealer=sealer,
                        sessions_complete=cfg.write_policy == "write_through")
        if cfg.verify_on_start:
            cold.verify()  # before the writer starts: damaged records become misses, never served
        # a queued block is in host RAM: named warm when there is a warm tier, else cold (its destination)
        queue_name = "warm" if any(t.name == "warm" for t in caches) else "cold"
        durable = WriteBehindTier(cold, batch=cfg.writer_batch, threads=cfg.compress_threads, protected=protected,
                                  tracer=tracer, queue_name=queue_name)
    shared = None
    if cfg.remote is not None:
        from .remote import RemoteTier
        from .remote.block_tier import RemoteBlockTier

        shared = RemoteBlockTier(RemoteTier(cfg.remote, sealer=sealer, tracer=tracer), codec, sealer=sealer)
    return TierList(caches, durable, [shared] if shared is not None else [], shared)
