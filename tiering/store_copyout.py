"""Copy-out: blocks of a chain written straight into a caller's buffer (a shared-memory arena), each
checked on the bytes written there. The side of :class:`~tiering.store.TieredStore` that serves
``GetShm``.

Where :meth:`TieredStore.iter_blocks` hands out the tier's own block (and a caller copies it), here
the store writes every block into ``region`` itself:

* a block in a memory tier costs one copy (a device-to-host copy for a GPU block), checksummed on the
  destination in the same pass (:mod:`tiering.bytecopy`);
* a cold block is decompressed (and unshuffled) *into* the region, never into a buffer of its own;
  its record's checksum is checked on the region's bytes. With ``promote``, a copy of it then goes to
  the top memory tier as a ``get`` would put it there.

The work is planned on the calling thread (which blocks, in prefix order, where, until a miss, a
refused block, the deadline or a block that does not fit) and done on the copy threads. A block
whose bytes fail their check ends the answer there, as a miss: no byte that failed is reported.
The keys are leased (unevictable) for the call. A mixin: it uses the store's lock, tiers and leases.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from opentelemetry import trace

from .bytecopy import copy_many, spread
from .keys import BlockKey
from .layout import blocks_for
from .spans import TierOps, now_ns
from .tier import Block

log = logging.getLogger(__name__)


@dataclass
class CopyOut:
    """What :meth:`CopyOutMixin.copy_out` wrote.

    :ivar items: ``(key, block, tier, offset)`` in prefix order: ``block`` describes the bytes now at
        ``offset`` of the region (dtype, shape, checksum), ``tier`` is where they came from.
    :ivar stop: why it ended before the last key: ``""`` (it did not), ``"miss"`` (no tier has the next
        block, ``accept`` refused it, or its bytes failed their check), ``"region"`` (it does not fit;
        ``next_bytes`` says how big it is) or ``"deadline"``.
    """

    items: list[tuple[BlockKey, Block, str, int]] = field(default_factory=list)
    stop: str = ""
    next_bytes: int = 0


@dataclass
class _Planned:
    key: BlockKey
    offset: int  # in the region
    tier: str
    block: Block | None = None  # a memory tier's block
    header: object = None  # a cold record's header, and the plain record
    record: bytes = b""
    nbytes: int = 0
    ns_id: bytes = b""


class CopyOutMixin:
    """:meth:`copy_out` of :class:`~tiering.store.TieredStore`."""

    def copy_out(self, keys: Sequence[BlockKey], region: np.ndarray, *, align: int = 4096,
                 accept: Callable[[bytes], bool] | None = None, deadline: float | None = None,
                 promote: bool = True) -> CopyOut:
        """Write the blocks of ``keys`` (prefix order) into ``region``, each at the next multiple of
        ``align``, until a miss, a block ``accept`` refuses (given its namespace id), the ``deadline``
        (``time.monotonic()``) or a block that does not fit.

        :param region: a writable, C-contiguous ``uint8`` array.
        :param promote: put a copy of each cold block into the top memory tier (as :meth:`get` does).
        :returns: the blocks written and why it stopped (:class:`CopyOut`).
        :raises TierUnavailable: if the store is closed. Thread-safe.
        """
        self._check_open()
        keys = list(keys)
        lease = self.leases.acquire(keys, self.config.lease_s)
        parent = trace.get_current_span()
        ops = TierOps(self.tracer, parent) if parent.is_recording() else None
        with self._lock:
            self.stats.gets += 1
            since = self._tombstones.begin_read()
        try:
            plan, result = self._plan_copy(keys, region.nbytes, align, accept, deadline, ops)
            ok = self._do_copy(plan, region, ops)
            if ok < len(plan):
                result.stop, result.next_bytes = "miss", 0
            for p in plan[:ok]:
                block = p.block
                if block is None:  # a cold block: described by its record, its bytes are the region's
                    raw = region[p.offset:p.offset + p.nbytes]
                    block = Block(torch.from_numpy(raw), p.header.dtype, p.header.shape, p.header.checksum, p.ns_id)
                    if promote and self.memory:
                        own = raw.copy()  # the region is the caller's: the tier keeps its own bytes
                        self._promote(p.key, block.with_data(torch.from_numpy(own)), "cold", ops, since)
                result.items.append((p.key, block, p.tier, p.offset))
            return result
        finally:
            with self._lock:
                self._tombstones.end_read(since)
            self.leases.release(lease)
            if ops is not None:
                ops.finish()

    def _plan_copy(self, keys: list[BlockKey], size: int, align: int, accept, deadline: float | None,
                   ops: TierOps | None) -> tuple[list[_Planned], CopyOut]:
        """Where each block goes, in prefix order, and why the plan ends (no bytes move yet)."""
        plan: list[_Planned] = []
        result = CopyOut()
        pos = 0
        for key in keys:
            if deadline is not None and time.monotonic() > deadline:
                result.stop = "deadline"
                break
            p = self._locate(key, ops)
            if p is None or (accept is not None and not accept(p.ns_id)):
                result.stop = "miss"
                break
            if pos + p.nbytes > size:
                result.stop, result.next_bytes = "region", p.nbytes
                break
            p.offset = pos
            plan.append(p)
            pos += blocks_for(max(p.nbytes, 1), align) * align
        return plan, result

    def _locate(self, key: BlockKey, ops: TierOps | None) -> _Planned | None:
        """The block of ``key`` from the highest tier that has it (an access), or ``None``."""
        t0 = now_ns() if ops is not None else 0
        with self._lock:
            for tier in self.memory:
                block = tier.get(key)
                if block is not None:
                    self.stats.tier(tier.name).hits += 1
                    if ops is not None:
                        ops.record(f"{tier.name}.read", t0, now_ns(), nbytes=block.nbytes)
                    return _Planned(key, 0, tier.name, block=block, nbytes=block.nbytes, ns_id=block.ns_id)
                self.stats.tier(tier.name).misses += 1
            block = self._pending.get(key)
            if block is not None:
                return _Planned(key, 0, self._pending_tier, block=block, nbytes=block.nbytes, ns_id=block.ns_id)
        if self.cold is None:
            return None
        record = self.cold.get_record(key)
        opened = None if record is None else self.cold.open(key, record)
        if ops is not None:
            ops.record("cold.read", t0, now_ns(), nbytes=len(record or b""), hit=opened is not None)
        if opened is None:
            with self._lock:
                self.stats.tier("cold").misses += 1
            return None
        header, plain = opened
        return _Planned(key, 0, "cold", header=header, record=plain, nbytes=header.raw_length,
                        ns_id=self.cold.ns_of(key) or b"")

    def _do_copy(self, plan: list[_Planned], region: np.ndarray, ops: TierOps | None) -> int:
        """Move every planned block into ``region`` on the copy threads; the number of leading blocks
        whose bytes there passed their check."""
        for p in plan:  # GPU blocks: device-to-host into the region first (hashed with the rest)
            if p.block is not None and p.block.data.device.type != "cpu":
                torch.from_numpy(region[p.offset:p.offset + p.nbytes]).copy_(p.block.data.reshape(-1))
        memory = [p for p in plan if p.block is not None]
        sums = copy_many([(region[p.offset:p.offset + p.nbytes],
                           p.block.data.numpy().reshape(-1) if p.block.data.device.type == "cpu"
                           else region[p.offset:p.offset + p.nbytes]) for p in memory])
        good = {id(p) for p, got in zip(memory, sums) if got == p.block.checksum}
        cold = [p for p in plan if p.block is None]

        def decode(p: _Planned) -> bool:
            t0 = now_ns() if ops is not None else 0
            block = self.cold.decode(p.key, p.record, region[p.offset:p.offset + p.nbytes], opened=True)
            if ops is not None:
                ops.record("codec.decode", t0, now_ns(), nbytes=len(p.record), raw_bytes=p.nbytes,
                           hit=block is not None)
            return block is not None

        before = self.cold.checksum_failures if self.cold is not None else 0
        decoded = spread(decode, cold, sum(p.nbytes for p in cold), self._pool)  # the fetch threads decode
        good |= {id(p) for p, ok in zip(cold, decoded) if ok}
        with self._lock:
            self.stats.tier("cold").hits += sum(decoded)
            if self.cold is not None:
                self.stats.tier("cold").checksum_failures += self.cold.checksum_failures - before
                self.stats.tier("cold").misses += len(cold) - sum(decoded)
        ok = next((i for i, p in enumerate(plan) if id(p) not in good), len(plan))
        if ok < len(plan) and plan[ok].block is not None:
            log.error("block %s of the %s tier failed its checksum on its way out (its bytes were not used)",
                      plan[ok].key, plan[ok].tier)
        return ok

