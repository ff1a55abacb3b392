"""Lookup, ownership, prefetch and stats: the side of :class:`~tiering.store.TieredStore` that moves no
bytes to the caller (lookup, where, owned, usage, snapshot, check) or moves them up ahead of the caller
(prefetch).

A mixin: it uses the store's lock, tiers, leases and pools, and is not meant to stand alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from concurrent.futures import Future

import numpy as np
from opentelemetry import trace

from .errors import InvalidBlock
from .keys import BlockKey, Namespace, chain_keys
from .results import LookupResult, PrefetchHandle
from .spans import TierOps

log = logging.getLogger(__name__)


class ReadsMixin:
    """Lookup, tenancy checks and prefetch of :class:`~tiering.store.TieredStore`."""

    # ------------------------------------------------------------------------------------------------
    # lookup, prefetch, sessions
    def namespace_of(self, ns_id: bytes) -> Namespace | None:
        """The namespace registered under ``ns_id`` (a :attr:`Block.ns_id`), or ``None`` if unknown.

        Lets the service check that a block requested by key belongs to the caller's tenant.
        """
        with self._lock:
            return self._namespaces.get(ns_id)

    def owned(self, keys: Sequence[BlockKey], tenant: str) -> list[bool]:
        """Whether each key is held (anywhere) for a namespace of ``tenant``: False for a block of
        another tenant and for an absent one alike. Reads namespace ids only; moves no data and
        changes no recency, so a caller can drop foreign keys before any load or promotion."""
        keys = list(keys)
        ns_ids: list[bytes | None] = []
        with self._lock:
            for k in keys:
                block = next((t.peek(k) for t in self.memory if t.contains(k)), None) or self._pending.get(k)
                ns_ids.append(None if block is None else block.ns_id)
        if self.cold is not None:
            ns_ids = [i if i is not None else self.cold.ns_of(k) for k, i in zip(keys, ns_ids)]
        with self._lock:
            return [i is not None and (ns := self._namespaces.get(i)) is not None and ns.tenant == tenant
                    for i in ns_ids]

    def tenant_usage(self, tenant: str) -> dict[str, int]:
        """Bytes ``tenant`` holds: ``memory`` (hot + warm, as their ``used_bytes`` count) and ``cold``
        (committed record footprints; blocks still queued for the writer are not counted yet)."""
        with self._lock:
            ns_ids = [i for i, ns in self._namespaces.items() if ns.tenant == tenant]
            memory = sum(t.ns_used_bytes(ns_ids) for t in self.memory)
        cold = self.cold.ns_used_bytes(ns_ids) if self.cold is not None else 0
        return {"memory": memory, "cold": cold}

    def session_count(self, tenant: str) -> int:
        """Sessions of ``tenant``, expired ones included until swept (O(the tenant's sessions))."""
        prefix = tenant.encode("utf-8") + b"\0"
        with self._lock:
            if self.cold is None:
                return sum(1 for sid in self._mem_sessions if sid.startswith(prefix))
            pending = {sid: rec for sid, rec in self._pending_sessions.items() if sid.startswith(prefix)}
        stored = self.cold.session_count(prefix)
        # queued records change the count: a new session adds one, a queued deletion removes one
        for sid, rec in pending.items():
            on_disk = self.cold.session_get(sid) is not None
            stored += (rec is not None) - on_disk
        return stored

    def where(self, key: BlockKey) -> str | None:
        """The highest tier holding ``key`` now (no data movement, no recency change)."""
        return self._where([key])[0]

    def _where(self, keys: list[BlockKey]) -> list[str | None]:
        out: list[str | None] = []
        with self._lock:
            for k in keys:
                out.append(next((t.name for t in self.memory if t.contains(k)),
                                self._pending_tier if k in self._pending else None))
        missing = [i for i, t in enumerate(out) if t is None]
        if missing and self.cold is not None:
            on_disk = self.cold.contains_many([keys[i] for i in missing])
            for i, here in zip(missing, on_disk):
                if here:
                    out[i] = "cold"
        return out

    def lookup(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray | None = None, *,
               keys: Sequence[BlockKey] | None = None) -> LookupResult:
        """The longest cached prefix of ``token_ids`` (or of ``keys``) and the tier of each block.

        Moves no data and changes no recency. A partial last block counts its own tokens only.
        """
        self._check_open()
        if keys is None:
            if token_ids is None:
                raise InvalidBlock("lookup needs token ids or keys", field="token_ids")
            keys = chain_keys(namespace, token_ids)
            n_tokens = len(token_ids)
        else:
            keys = list(keys)
            n_tokens = None
        with self.tracer.start_as_current_span("kvtier.lookup") as span:
            tiers: list[str] = []
            for t in self._where(list(keys)):
                if t is None:
                    break
                tiers.append(t)
            bt = namespace.layout.block_tokens
            tokens = min(len(tiers) * bt, n_tokens) if n_tokens is not None else len(tiers) * bt
            span.set_attribute("kvtier.blocks", len(tiers))
        return LookupResult(list(keys[:len(tiers)]), tiers, tokens)

    def prefetch(self, keys: Sequence[BlockKey], *, deadline: float | None = None) -> PrefetchHandle:
        """Start moving ``keys`` up to the top tier, in order, and return at once.

        The keys stay pinned until the prefetch ends plus ``lease_s`` (or until ``deadline``, a
        ``time.monotonic()`` instant, if that comes first), so the following get finds them. A get of
        a block still being loaded waits for that load instead of reading it twice.
        """
        self._check_open()
        keys = list(keys)
        lease_s = self.config.lease_s
        # While running, the pins last until the deadline (or one lease_s); when the prefetch ends
        # they are renewed for lease_s from then, so the Get that follows finds its blocks.
        run_s = lease_s if deadline is None else max(0.0, min(lease_s, deadline - time.monotonic()))
        lease = self.leases.acquire(keys, run_s)
        with self._lock:
            self.stats.prefetches += 1
        ctx = trace.get_current_span().get_span_context()
        t0 = time.monotonic()
        fut = self._prefetch_pool.submit(self._prefetch_run, keys, deadline, ctx)

        def finished(_f: Future) -> None:
            self.leases.extend(lease, lease_s)
            self._report_timing("prefetch", t0)

        fut.add_done_callback(finished)
        return PrefetchHandle(keys, fut, lease)

    def _report_timing(self, what: str, t0: float) -> None:
        hook = self.on_timing
        if hook is not None:
            try:
                hook(what, time.monotonic() - t0)
            except Exception:  # a metrics hook must never break a prefetch
                log.debug("timing hook failed", exc_info=True)

    def _prefetch_run(self, keys: list[BlockKey], deadline: float | None, parent) -> int:
        """Coordinator of one prefetch: keeps ``window`` block loads in flight on the fetch pool, so
        LMDB reads, decompression and host→device copies of consecutive blocks overlap."""
        links = [trace.Link(parent)] if parent is not None and parent.is_valid else []
        window = max(2, self.config.prefetch_threads * 2)
        with self.tracer.start_as_current_span("kvtier.prefetch", links=links) as span:
            span.set_attribute("kvtier.blocks_requested", len(keys))
            # one span per tier op for the whole prefetch, children of kvtier.prefetch
            ops = TierOps(self.tracer, span) if span.is_recording() else None
            futures: list[Future] = []
            done = nxt = 0
            try:
                for idx in range(len(keys)):
                    while nxt < len(keys) and nxt < idx + window:
                        futures.append(self._pool.submit(self._prefetch_one, keys[nxt], ops))
                        nxt += 1
                    if self._closed or (deadline is not None and time.monotonic() > deadline):
                        span.set_attribute("kvtier.deadline_hit", True)
                        break
                    if not futures[idx].result():
                        break
                    done += 1
            finally:
                for f in futures[done:]:
                    f.cancel()
                if ops is not None:
                    ops.finish()
            span.set_attribute("kvtier.blocks", done)
            return done

    def _prefetch_one(self, key: BlockKey, ops: TierOps | None = None) -> bool:
        top = self.memory[0] if self.memory else None
        with self._lock:
            if top is not None and top.contains(key):
                return True
        return self._get(key, True, ops) is not None

    # ------------------------------------------------------------------------------------------------
    # stats
    def usage(self) -> dict[str, dict[str, int]]:
        """Per tier: blocks, used bytes, capacity bytes."""
        out = {}
        with self._lock:
            for t in self.memory:
                out[t.name] = {"blocks": len(t), "used_bytes": t.used_bytes, "capacity_bytes": t.capacity_bytes}
        if self.cold is not None:
            out["cold"] = {"blocks": self.cold.block_count(), "used_bytes": self.cold.used_bytes,
                           "capacity_bytes": self.cold.capacity_bytes}
        return out

    def snapshot(self) -> dict:
        """Counters, usage, pins and queue depths in one dict (for the Stats RPC and metrics)."""
        with self._lock:
            snap = self.stats.snapshot()
            snap["pending_writes"] = len(self._pending)
            snap["inflight_loads"] = len(self._inflight)
        snap["usage"] = self.usage()
        snap["pinned_blocks"] = self.leases.pinned_keys()
        snap["active_leases"] = self.leases.active()
        snap["write_queue_depth"] = self._writer.depth() if self._writer else 0
        raw, rec = snap["cold_raw_bytes_written"], snap["cold_record_bytes_written"]
        snap["compression_ratio"] = raw / rec if rec else None
        return snap

    def check(self) -> list[str]:
        """Verify internal invariants (accounting matches contents, used <= capacity, for every tier
        the cold one included: O(blocks)); returns problems found, [] if none."""
        problems = []
        with self._lock:
            for t in self.memory:
                real = sum(t.peek(k).nbytes for k in t.keys())
                if real != t.used_bytes:
                    problems.append(f"{t.name}: used_bytes {t.used_bytes} != sum of blocks {real}")
                if t.used_bytes > t.capacity_bytes:
                    problems.append(f"{t.name}: over capacity")
                if len(t.policy) != len(t):
                    problems.append(f"{t.name}: policy tracks {len(t.policy)} keys, tier holds {len(t)}")
                per_ns: dict[bytes, int] = {}
                for k in t.keys():
                    per_ns[t.peek(k).ns_id] = per_ns.get(t.peek(k).ns_id, 0) + t.peek(k).nbytes
                if any(t.ns_used_bytes([i]) != n for i, n in per_ns.items()) or t.ns_used_bytes(per_ns) != t.used_bytes:
                    problems.append(f"{t.name}: per-namespace byte counts disagree with its blocks")
        if self.cold is not None:
            problems += self.cold.check()
        return problems
