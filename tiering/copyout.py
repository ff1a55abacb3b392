"""Copy-out: blocks of a chain written straight into a caller's buffer (a shared-memory arena), each
checked on the bytes written there. What serves ``GetShm``. Imports ``tierlist``, ``placement``,
``bytecopy``, ``spans`` and ``tier``.

Where :meth:`TieredStore.iter_blocks` hands out the tier's own block (and a caller copies it), here
the store writes every block into ``region`` itself:

* a block a tier holds whole (a memory tier, the write queue) costs one copy (a device-to-host copy
  for a GPU block), checksummed on the destination in the same pass (:mod:`tiering.bytecopy`);
* a block a tier must decode (a cold record, :attr:`~tiering.tier.Fetched.decode_into`) is decompressed
  (and unshuffled) *into* the region, never into a buffer of its own; its checksum is checked on the
  region's bytes. With ``promote``, a copy of it then goes to the top cache as a ``get`` would put it.

The work is planned on the calling thread (which blocks, in prefix order, where, until a miss, a
refused block, the deadline or a block that does not fit) and done on the copy threads. A block
whose bytes fail their check ends the answer there, as a miss: no byte that failed is reported.
The keys are leased (unevictable) for the call.

:meth:`CopyOuts.scatter_out` does the same into a layer-major KV destination (:class:`tiering.scatter.KVDest`,
the final K/V tensors of an attention cache): each block lands at its token offset, checksummed on the
destination's bytes; a cold block is decoded into a buffer of its own first (the destination's rows are
not the record's order), which then becomes the promoted copy. There a block failing its check ends the
answer with ``stop == "damaged"``, which callers report as data loss.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .bytecopy import copy_many, spread
from .errors import InvalidBlock
from .keys import BlockKey
from .layout import blocks_for
from .leases import LeaseTable
from .placement import Placement
from .scatter import KVDest
from .spans import TierOps, now_ns
from .stats import StoreStats
from .tier import Block, Fetched
from .tierlist import TierList
from .tombstones import Tombstones

log = logging.getLogger(__name__)


@dataclass
class CopyOut:
    """What :meth:`CopyOuts.copy_out` wrote.

    :ivar items: ``(key, block, tier, offset)`` in prefix order: ``block`` describes the bytes now at
        ``offset`` of the region (dtype, shape, checksum), ``tier`` is where they came from.
    :ivar stop: why it ended before the last key: ``""`` (it did not), ``"miss"`` (no tier has the next
        block, ``accept`` refused it, or its bytes failed their check), ``"region"`` (it does not fit;
        ``next_bytes`` says how big it is) or ``"deadline"``; from :meth:`CopyOuts.scatter_out` also
        ``"damaged"`` (the next block's bytes failed their check; ``items`` ends before it).
    """

    items: list[tuple[BlockKey, Block, str, int]] = field(default_factory=list)
    stop: str = ""
    next_bytes: int = 0


@dataclass
class _Planned:
    key: BlockKey
    offset: int  # in the region
    found: Fetched
    decoded: Block | None = None  # for a block decoded into the region: its description
    own: Block | None = None  # for a block decoded into a buffer of its own (scatter): the block itself




class CopyOuts:
    """:meth:`copy_out` over ``tiers``; its collaborators are the store's (see :class:`~tiering.loader.Loader`).

    :param pool: the fetch threads (they decode: their freed memory is reused for decoding), ``pool_threads`` of them.
    """

    def __init__(self, tiers: TierList, placement: Placement, *, lock: threading.RLock, leases: LeaseTable,
                 stats: StoreStats, tombstones: Tombstones, pool: ThreadPoolExecutor, pool_threads: int, tracer,
                 lease_s: float) -> None:
        self.tiers = tiers
        self.placement = placement
        self.lock = lock
        self.leases = leases
        self.stats = stats
        self.tombstones = tombstones
        self.pool = pool
        self.pool_threads = pool_threads
        self.tracer = tracer
        self.lease_s = lease_s

    def copy_out(self, keys: Sequence[BlockKey], region: np.ndarray, *, align: int = 4096,
                 accept: Callable[[bytes], bool] | None = None, deadline: float | None = None,
                 promote: bool = True, exact_only: bool = False) -> CopyOut:
        """Write the blocks of ``keys`` (prefix order) into ``region``, each at the next multiple of
        ``align``, until a miss, a block ``accept`` refuses (given its namespace id), with ``exact_only``
        a lossy block (a miss: none of its bytes reach the region), the ``deadline``
        (``time.monotonic()``) or a block that does not fit.

        :param region: a writable, C-contiguous ``uint8`` array.
        :param promote: put a copy of each decoded block into the top cache (as a get does).
        :returns: the blocks written and why it stopped (:class:`CopyOut`). Thread-safe.
        """
        def extent(found: Fetched) -> tuple[int, int]:
            return found.nbytes, blocks_for(max(found.nbytes, 1), align) * align

        return self._run(keys, region.nbytes, 0, extent, lambda plan, ops: self._copy(plan, region, ops),
                         accept, deadline, promote, exact_only, "miss")

    def scatter_out(self, keys: Sequence[BlockKey], dest: KVDest, *, accept: Callable[[bytes], bool] | None = None,
                    deadline: float | None = None, promote: bool = True, exact_only: bool = False) -> CopyOut:
        """Write the blocks of ``keys`` (prefix order) into ``dest``, the first at ``dest.first_token``,
        each next one right after the previous, stopping as :meth:`copy_out` does (``"region"``: the
        next block's tokens pass ``dest.capacity``; ``next_bytes`` is then its size) and at a block whose
        bytes fail their check on the destination (``"damaged"``).

        :returns: :class:`CopyOut` whose ``offset`` of each item is the block's first token in ``dest``.
        :raises InvalidBlock: (field ``destination``) for a block whose dtype or geometry is not the
            destination's; blocks before it may have been written. Thread-safe.
        """
        unit = dest.token_bytes

        def extent(found: Fetched) -> tuple[int, int]:
            if found.nbytes % unit or not found.nbytes:
                raise InvalidBlock(f"a block of {found.nbytes} bytes is not whole tokens of the destination's "
                                   f"geometry {dest.geometry}", field="destination")
            return found.nbytes // unit, found.nbytes // unit

        return self._run(keys, dest.capacity, dest.first_token, extent,
                         lambda plan, ops: self._scatter(plan, dest, ops), accept, deadline, promote, exact_only,
                         "damaged")

    def _run(self, keys: Sequence[BlockKey], size: int, start: int, extent, move, accept, deadline: float | None,
             promote: bool, exact_only: bool, damaged: str) -> CopyOut:
        """Lease, plan (positions from ``start`` in units of ``size`` by ``extent``), ``move`` the bytes
        (the number of leading blocks that passed their check) and describe the result (a failed block
        stops it with ``damaged``)."""
        keys = list(keys)
        lease = self.leases.acquire(keys, self.lease_s)
        ops = TierOps.under_current_span(self.tracer)
        failures = {id(t): t.checksum_failures for t in self.tiers.slow}
        with self.lock:
            self.stats.gets += 1
            since = self.tombstones.begin_read()
        try:
            plan, result = self._plan(keys, size, start, extent, accept, deadline, ops, exact_only)
            ok = move(plan, ops)
            if ok < len(plan):
                result.stop, result.next_bytes = damaged, 0
            for p in plan[:ok]:
                block = p.found.block
                if block is None:  # decoded: described by its record
                    block = p.decoded
                    if promote:
                        self.placement.promote(p.key, p.own if p.own is not None else block.with_data(
                            torch.from_numpy(p.decoded.data.numpy().copy())),  # the region is the caller's
                            p.found.tier, ops, since)
                result.items.append((p.key, block, p.found.tier, p.offset))
            return result
        finally:
            with self.lock:
                self.tombstones.end_read(since)
                for t in self.tiers.slow:
                    self.stats.tier(t.name).checksum_failures += t.checksum_failures - failures[id(t)]
            self.leases.release(lease)
            if ops is not None:
                ops.finish()

    def _plan(self, keys: list[BlockKey], size: int, pos: int, extent, accept, deadline: float | None,
              ops: TierOps | None, exact_only: bool) -> tuple[list[_Planned], CopyOut]:
        """Where each block goes, in prefix order, and why the plan ends (no bytes move yet)."""
        plan: list[_Planned] = []
        result = CopyOut()
        for key in keys:
            if deadline is not None and time.monotonic() > deadline:
                result.stop = "deadline"
                break
            found = self._locate(key, ops)
            if found is None or (accept is not None and not accept(found.ns_id)) or (exact_only and found.lossy):
                result.stop = "miss"
                break
            need, advance = extent(found)
            if pos + need > size:
                result.stop, result.next_bytes = "region", found.nbytes
                break
            plan.append(_Planned(key, pos, found))
            pos += advance
        return plan, result

    def _locate(self, key: BlockKey, ops: TierOps | None) -> Fetched | None:
        """The block of ``key`` from the highest tier that has it (an access), or ``None``."""
        t0 = now_ns() if ops is not None else 0
        with self.lock:
            for tier in self.tiers.fast:
                block = tier.get(key)
                if block is not None:
                    self.stats.tier(tier.name).hits += 1
                    if ops is not None:
                        ops.record(f"{tier.name}.read", t0, now_ns(), nbytes=block.nbytes)
                    return Fetched(tier.name, block.nbytes, block.ns_id, block=block, lossy=block.lossy)
                self.stats.tier(tier.name).misses += 1
        for tier in self.tiers.slow:
            found = self.tiers.guarded(tier, lambda: tier.fetch(key, ops), None)
            if found is None:
                with self.lock:
                    self.stats.tier(tier.name).misses += 1
                continue
            if found.block is not None and found.tier == tier.name:
                with self.lock:
                    self.stats.tier(tier.name).hits += 1
            return found
        return None

    def _copy(self, plan: list[_Planned], region: np.ndarray, ops: TierOps | None) -> int:
        """Move every planned block into ``region`` (whole blocks on the copy threads, decoding on the
        fetch threads); the number of leading blocks whose bytes there passed their check."""
        whole = [p for p in plan if p.found.block is not None]
        for p in whole:  # GPU blocks: device-to-host into the region first (hashed with the rest)
            if p.found.block.data.device.type != "cpu":
                torch.from_numpy(region[p.offset:p.offset + p.found.nbytes]).copy_(p.found.block.data.reshape(-1))
        sums = copy_many([(region[p.offset:p.offset + p.found.nbytes],
                           p.found.block.data.numpy().reshape(-1) if p.found.block.data.device.type == "cpu"
                           else region[p.offset:p.offset + p.found.nbytes]) for p in whole])
        good = {id(p) for p, got in zip(whole, sums) if got == p.found.block.checksum}
        coded = [p for p in plan if p.found.block is None]

        def decode(p: _Planned) -> bool:
            p.decoded = p.found.decode_into(region[p.offset:p.offset + p.found.nbytes], ops)
            return p.decoded is not None

        return self._decode_all(plan, coded, decode, good)

    def _scatter(self, plan: list[_Planned], dest: KVDest, ops: TierOps | None) -> int:
        """Move every planned block into ``dest`` (whole blocks on the copy threads, cold ones decoded
        into their own buffer on the fetch threads, then placed); the number of leading blocks whose
        bytes there passed their check."""
        def check(block: Block) -> None:
            if not dest.fits(block.dtype, block.shape):
                raise InvalidBlock(f"a block of {block.dtype} {tuple(block.shape)} does not fit the destination's "
                                   f"geometry {dest.geometry}", field="destination")

        def place(p: _Planned) -> bool:
            block = p.found.block
            check(block)
            return dest.place_tensor(p.offset, block.data, block.tokens) == block.checksum

        def decode(p: _Planned) -> bool:
            buf = np.empty(p.found.nbytes, dtype=np.uint8)
            p.decoded = p.found.decode_into(buf, ops)
            if p.decoded is None:
                return False
            check(p.decoded)
            p.own = p.decoded.with_data(torch.from_numpy(buf))
            return dest.place(p.offset, buf, p.decoded.tokens) == p.decoded.checksum

        whole = [p for p in plan if p.found.block is not None]
        coded = [p for p in plan if p.found.block is None]
        good = {id(p) for p, ok in zip(whole, spread(place, whole, sum(p.found.nbytes for p in whole))) if ok}
        return self._decode_all(plan, coded, decode, good)

    def _decode_all(self, plan: list[_Planned], coded: list[_Planned], decode: Callable[[_Planned], bool],
                    good: set[int]) -> int:
        """Run ``decode`` over the ``coded`` blocks on the fetch threads (counted as hits or misses of
        their tier); the number of leading blocks of ``plan`` in ``good`` (ids) or decoded."""
        decoded = spread(decode, coded, sum(p.found.nbytes for p in coded), self.pool, self.pool_threads)
        good |= {id(p) for p, ok in zip(coded, decoded) if ok}
        with self.lock:
            for p, ok in zip(coded, decoded):
                self.stats.tier(p.found.tier).hits += ok
                self.stats.tier(p.found.tier).misses += not ok
        ok = next((i for i, p in enumerate(plan) if id(p) not in good), len(plan))
        if ok < len(plan) and plan[ok].found.block is not None:  # a cold tier logs its own failures
            log.error("block %s of the %s tier failed its checksum on its way out (its bytes were not used)",
                      plan[ok].key, plan[ok].found.tier)
        return ok
