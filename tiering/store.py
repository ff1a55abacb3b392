"""TieredStore: places, finds, moves and forgets KV blocks across hot → warm → cold.

Placement. A put lands in the highest enabled memory tier (hot if there is a GPU, else warm). A tier
that runs out of room demotes its least valuable unpinned blocks (its policy decides) one tier down;
blocks leaving the last memory tier are dropped (``write_through``: they are on disk already) or
queued for disk (``write_back``). A read that hits a lower tier promotes the block to the top tier.

Write policy. ``write_through`` queues every admitted block for the cold tier, so memory tiers are
caches over the disk. ``write_back`` writes a block to disk only when it leaves memory. Either way a
put may be *durable*: it returns only once its blocks and its session are committed to LMDB.

Concurrency. One re-entrant lock guards the memory tiers, the policies, the pending-write table and
the single-flight table; it is never held across LMDB I/O, decompression or a host→device copy
(those happen before publishing under the lock). Concurrent reads of one block that must come from
disk do the work once (single-flight). Reads and prefetches pin their blocks with expiring leases.

Files. The class is one object split by concern: this file holds opening/closing, put, get and
placement (insert, demote, promote); ``store_reads.py`` lookup, tenancy checks, prefetch and stats;
``store_sessions.py`` session records, resume, deletion, invalidation and expiry; ``results.py`` the
values returned.

Copies per path (bytes of one block): put → top tier 1 (stage); write to disk 2 (shuffle, compress);
hit in top tier 0; warm → hot promotion 1; cold → top tier 3 (LMDB read, decompress+unshuffle,
stage onto the tier's device).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from opentelemetry import trace

from .bytecopy import copy_many
from .codec import Codec, CodecId, checksum
from .cold import ColdTier
from .config import StoreConfig
from .crypto import RecordSealer
from .dtypes import torch_dtype
from .errors import InvalidBlock, LayoutMismatch, TierUnavailable
from .hot import make_hot_tier
from .keys import BlockKey, Namespace, chain_keys
from .leases import LeaseTable
from .memory import MemoryTier
from .sessions import Session, namespace_to_dict, session_id_key
from .spans import TierOps, now_ns, session_hash
from .stats import StoreStats
from .tier import Block
from .tombstones import Tombstones
from .warm import make_warm_tier
from .writer import ColdWriter, WriteJob
from .results import LookupResult, PrefetchHandle, PutResult
from .store_copyout import CopyOutMixin
from .store_reads import ReadsMixin
from .store_sessions import SessionsMixin

log = logging.getLogger(__name__)

_CODECS = {"shuffle_zstd": CodecId.SHUFFLE_ZSTD, "zstd": CodecId.ZSTD, "raw": CodecId.RAW}

#: ``Payload`` is what callers may hand to :meth:`TieredStore.put`: a tensor or array whose dtype and
#: shape match the layout, or raw bytes of the right length.
Payload = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


__all__ = ["LookupResult", "Payload", "PrefetchHandle", "PutResult", "TieredStore"]


class TieredStore(ReadsMixin, SessionsMixin, CopyOutMixin):
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
        self._sealer = sealer
        self.tracer = tracer or trace.get_tracer("kvtier.tiering")
        #: metrics hook: called ``on_timing("prefetch"|"resume", seconds)`` when a prefetch or a resume's
        #: prefetch finishes (set by ``service.metrics``; must not block).
        self.on_timing = None
        self.stats = StoreStats()
        self.leases = LeaseTable()
        self._lock = threading.RLock()
        self._closed = False
        self._lockfile = self._lock_data_dir(self.config.data_dir) if self.config.cold_enabled else None
        try:
            self._open()
        except BaseException:
            if self._lockfile is not None:
                self._lockfile.close()  # else the lock outlives the failed open, until GC
            raise

    def _open(self) -> None:
        cfg = self.config
        self.memory: list[MemoryTier] = [t for t in (make_hot_tier(cfg.hot_device, cfg.hot_capacity, cfg.policy),
                                                     make_warm_tier(cfg.warm_capacity, cfg.policy, cfg.warm_pin))
                                         if t is not None]
        self.codec = Codec(cfg.zstd_level, _CODECS[cfg.codec])
        self.cold: ColdTier | None = None
        self._writer: ColdWriter | None = None
        if cfg.cold_enabled:
            self.cold = ColdTier(os.path.join(cfg.data_dir, "cold"), cfg.cold_capacity, self.codec,
                                 durable_sync=cfg.durable_sync, sealer=self._sealer)
            self._writer = ColdWriter(self.cold, batch=cfg.writer_batch, threads=cfg.compress_threads,
                                      protected=self.leases.is_pinned, on_commit=self._on_commit,
                                      tracer=self.tracer)
        if not self.memory and self.cold is None:
            raise ValueError("every tier is off: enable at least one of hot, warm or cold")
        for t in self.tier_names():
            self.stats.tier(t)
        self._pending: dict[BlockKey, Block] = {}  # queued for the cold tier, not yet committed
        self._inflight: dict[BlockKey, Future] = {}  # single-flight of loads from the cold tier
        self._tombstones = Tombstones()  # erased blocks no earlier read may put back (tiering/tombstones.py)
        self._namespaces: dict[bytes, Namespace] = {}
        self._mem_sessions: dict[bytes, bytes] = {}  # session records when there is no cold tier
        self._pending_sessions: dict[bytes, bytes | None] = {}  # queued for the writer, newer than LMDB
        self._pending_session_writes: dict[bytes, int] = {}  # queued, uncommitted writes per session
        if self.cold is not None:
            from .sessions import namespace_from_dict
            self._namespaces = {k: namespace_from_dict(v) for k, v in self.cold.namespaces().items()}
        # Block loads (LMDB read, decode, staging) run on the fetch pool; prefetch coordinators on their
        # own pool so that a coordinator waiting for loads can never starve the loads it waits for.
        self._pool = ThreadPoolExecutor(max(2, cfg.prefetch_threads * 2), thread_name_prefix="kvtier-fetch")
        self._prefetch_pool = ThreadPoolExecutor(cfg.prefetch_threads, thread_name_prefix="kvtier-prefetch")
        self._stop = threading.Event()
        self._maint = threading.Thread(target=self._maintenance, name="kvtier-maintenance", daemon=True)
        self._maint.start()
        log.info("tiered store open: tiers %s, data dir %s, write policy %s",
                 ", ".join(f"{t.name}={t.device}:{t.capacity_bytes}B" for t in self.memory)
                 + (f", cold={cfg.cold_capacity}B" if self.cold else ""), cfg.data_dir, cfg.write_policy)

    # ------------------------------------------------------------------------------------------------
    # lifecycle
    @staticmethod
    def _lock_data_dir(data_dir: str):
        try:
            os.makedirs(data_dir, exist_ok=True)
            fh = open(os.path.join(data_dir, "kvtier.lock"), "a+")
        except OSError as exc:
            raise TierUnavailable(f"cannot use data directory {data_dir!r}: {exc}. Create it, make it "
                                  "writable, or pass another --data-dir") from exc
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            fh.seek(0)
            owner = fh.read().strip() or "unknown"
            fh.close()
            raise TierUnavailable(f"data directory {data_dir!r} is in use by another kvtier process (pid "
                                  f"{owner}); stop it or pass another --data-dir") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        return fh

    def flush(self, timeout: float | None = None) -> None:
        """Wait until every block and session queued for the cold tier so far is committed."""
        if self._writer is not None:
            self._writer.flush(timeout)

    def close(self) -> None:
        """Flush the write queue to disk, stop background threads, close the tiers. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        self._maint.join(5)
        self._prefetch_pool.shutdown(wait=True)
        self._pool.shutdown(wait=True)
        if self._writer is not None:
            self._writer.close()
        if self.cold is not None:
            self.cold.close()
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
        return [t.name for t in self.memory] + (["cold"] if self.cold is not None else [])

    @property
    def _pending_tier(self) -> str:
        """Tier named for a block queued for disk and in no memory tier: it is in host RAM, so
        ``warm`` when this store has a warm tier, else ``cold`` (where it is about to be)."""
        return "warm" if any(t.name == "warm" for t in self.memory) else "cold"

    @property
    def top_tier(self) -> str:
        return self.tier_names()[0]

    # ------------------------------------------------------------------------------------------------
    # put
    def _source(self, ns: Namespace, data: Payload, tokens: int, index: int, owned: bool) -> tuple[np.ndarray, bool]:
        """The bytes of one payload as a flat ``uint8`` array after checking them against the layout,
        and whether the store may keep that array as it is (``True``: nobody else holds it)."""
        lay = ns.layout
        shape = lay.shape(tokens)
        if isinstance(data, np.ndarray):
            if data.dtype == np.uint8 and data.ndim == 1:
                data = memoryview(np.ascontiguousarray(data))
            else:
                data = torch.from_numpy(np.ascontiguousarray(data))
        if isinstance(data, torch.Tensor):
            if data.dtype != torch_dtype(lay.dtype):
                raise LayoutMismatch(f"block {index} is {data.dtype} but the namespace's layout is {lay.dtype}")
            if tuple(data.shape) != shape:
                raise LayoutMismatch(f"block {index} has shape {tuple(data.shape)}; the layout "
                                     f"{lay.describe()} wants {shape} for {tokens} tokens")
            raw = data.detach().contiguous().to("cpu").reshape(-1).view(torch.uint8)
            # a fresh tensor (made contiguous, or brought from a device) is the store's to keep
            return raw.numpy(), raw.untyped_storage().data_ptr() != data.untyped_storage().data_ptr()
        mv = memoryview(data).cast("B")
        if len(mv) != lay.block_bytes(tokens):
            raise InvalidBlock(f"block {index} has {len(mv)} bytes; layout {lay.describe()} wants "
                               f"{lay.block_bytes(tokens)} for its {tokens} tokens", field="payload")
        # an owned bytearray is kept as it is; anything else is copied (the caller may reuse it)
        return np.frombuffer(mv, dtype=np.uint8), owned and type(data) is bytearray

    def _to_blocks(self, ns: Namespace, sources: list[tuple[np.ndarray, bool]], tokens: list[int],
                   store: list[bool], verify: bool) -> tuple[list[Block | None], list[int | None]]:
        """Blocks owning the bytes of the ``sources`` to ``store`` (``None`` for the others), and the
        XXH3-64 of every source (``None`` for one not stored when not ``verify``). Bytes not kept as
        they are get copied and checksummed in the same pass, on the copy threads (:mod:`tiering.bytecopy`)."""
        lay = ns.layout
        dsts = {i: np.empty(src.nbytes, dtype=np.uint8) for i, ((src, keep), c) in enumerate(zip(sources, store))
                if c and not keep}
        sums: list[int | None] = [None] * len(sources)
        for i, value in zip(dsts, copy_many([(dsts[i], sources[i][0]) for i in dsts])):
            sums[i] = value
        out: list[Block | None] = []
        for i, (src, _keep) in enumerate(sources):
            if sums[i] is None and (store[i] or verify):
                sums[i] = checksum(src)
            if not store[i]:
                out.append(None)
                continue
            raw = dsts.get(i, src)
            out.append(Block(torch.from_numpy(raw) if raw.nbytes else torch.empty(0, dtype=torch.uint8), lay.dtype,
                             lay.shape(tokens[i]), sums[i], ns.ns_id))
        return out, sums

    def put(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray, blocks: Sequence[Payload], *,
            first_block: int = 0, session_id: str | None = None, durable: bool = False, priority: int = 0,
            ttl_s: float | None = None, checksums: Sequence[int] | None = None,
            owned: bool = False) -> PutResult:
        """Store the KV blocks of ``token_ids`` (and, with ``session_id``, the session's chain).

        :param namespace: tenant, model, revision and layout the blocks belong to.
        :param token_ids: every token the blocks cover, from the start of the sequence.
        :param blocks: payloads of blocks ``first_block``, ``first_block+1``…; block i covers tokens
            ``[i*block_tokens, (i+1)*block_tokens)`` (the last one may be partial). Blocks before
            ``first_block`` are expected to be cached already (the client learnt that from a lookup).
        :param session_id: record ``token_ids``' key chain as this session of the tenant (replacing an
            older chain of the same session).
        :param durable: return only once the blocks and the session are committed to LMDB.
        :param checksums: the XXH3-64 each payload must have, checked on the store's own copy (so a
            payload changing under the call, e.g. in shared memory, can never be stored unverified).
        :param owned: ``bytearray`` payloads are handed over (nobody else holds them): the store keeps
            them instead of a copy. Other payloads are copied either way.
        :returns: the keys of all blocks and what happened to each block sent.
        :raises InvalidBlock: on bad sizes, counts or ids. :raises LayoutMismatch: when a tensor's
            dtype/shape disagrees with the layout. :raises CapacityExceeded: if a durable write finds
            the cold tier full. :raises TierUnavailable: if the store is closed, or durability is asked
            for without a cold tier. Nothing is stored when an error is raised before any block is.
        """
        self._check_open()
        keys = chain_keys(namespace, token_ids)
        n_tokens = len(token_ids)
        bt = namespace.layout.block_tokens
        if not 0 <= first_block <= len(keys) or first_block + len(blocks) > len(keys):
            raise InvalidBlock(f"{len(blocks)} blocks from index {first_block} do not fit the {len(keys)} blocks "
                               f"of {n_tokens} tokens", field="blocks")
        if durable and self.cold is None:
            raise TierUnavailable("a durable put needs the cold tier, which is off")
        sid = session_id_key(namespace.tenant, session_id) if session_id is not None else None
        if sid is not None:
            trace.get_current_span().set_attribute("kvtier.session", session_hash(sid))
        tokens = [min(bt, n_tokens - (first_block + i) * bt) for i in range(len(blocks))]
        sources = [self._source(namespace, data, tokens[i], first_block + i, owned) for i, data in enumerate(blocks)]
        if checksums is not None and len(checksums) != len(sources):
            raise InvalidBlock(f"{len(checksums)} checksums for {len(sources)} blocks", field="checksums")
        block_keys = keys[first_block:first_block + len(blocks)]
        admitted = n_tokens >= self.config.min_tokens
        present = self._present(block_keys) if admitted else [True] * len(block_keys)
        # a block already stored (or not admitted) is not copied, only checked against its checksum if one came
        built, sums = self._to_blocks(namespace, sources, tokens, [not here for here in present],
                                      checksums is not None)
        if checksums is not None:
            bad = next((i for i, (got, want) in enumerate(zip(sums, checksums)) if got != want), None)
            if bad is not None:
                raise InvalidBlock(f"block {first_block + bad}: checksum {sums[bad]:#018x} of the "
                                   f"bytes differs from {checksums[bad]:#018x} sent", field="checksums")
        result = PutResult(keys)
        with self._lock:
            self.stats.puts += 1
            if not admitted:
                result.skipped_not_admitted = list(block_keys)
                self.stats.blocks_skipped_admission += len(block_keys)
                return result
        to_disk: list[tuple[BlockKey, Block]] = []
        seen: set[BlockKey] = set()
        with self.tracer.start_as_current_span("kvtier.store.put") as span:
            for key, block, here in zip(block_keys, built, present):
                if here or key in seen:
                    result.skipped_present.append(key)
                    continue
                seen.add(key)
                placed = self._place(key, block, 0)
                if self.config.write_policy == "write_through" or durable or placed < 0:
                    to_disk.append((key, block))
                result.stored.append(key)
            span.set_attribute("kvtier.blocks", len(result.stored))
            span.set_attribute("kvtier.bytes", sum(src.nbytes for src, _ in sources))
        with self._lock:
            self.stats.blocks_stored += len(result.stored)
            self.stats.blocks_skipped_present += len(result.skipped_present)
            if namespace.ns_id not in self._namespaces:
                self._namespaces[namespace.ns_id] = namespace
                new_ns = {namespace.ns_id: json.dumps(namespace_to_dict(namespace)).encode()}
            else:
                new_ns = {}
        if durable and (result.skipped_present or first_block):
            # Durable covers the whole chain the session names, not just the blocks sent: blocks before
            # first_block (sent by earlier, non-durable puts) may still be in memory only (write_back).
            to_disk += self._not_durable_yet(keys[:first_block] + result.skipped_present)
        job = WriteJob(blocks=to_disk, namespaces=new_ns)
        if sid is not None:
            now = time.time()
            with self._lock:  # read-modify-write of the record: atomic against resume's touch
                old = self._load_session(sid)
                session = Session(namespace.tenant, session_id, namespace, keys, n_tokens,
                                  created=old.created if old else now, last_used=now, priority=priority,
                                  ttl_s=ttl_s if ttl_s is not None else self.config.session_ttl_s)
                self._store_session(session, job)
        # A durable put always waits for a job: jobs commit in order, so blocks it skipped because an
        # earlier put had queued them are on disk once its own (maybe empty) job is.
        if self._writer is not None and (job.blocks or job.sessions or job.namespaces or durable):
            with self._lock:
                for key, block in job.blocks:
                    self._pending[key] = block
            fut = self._writer.submit(job)
            if durable:
                fut.result()
        return result

    def _not_durable_yet(self, keys: list[BlockKey]) -> list[tuple[BlockKey, Block]]:
        """Of ``keys`` (present somewhere), the blocks held only in memory: neither on disk nor queued."""
        keys = list(dict.fromkeys(keys))
        on_disk = self.cold.contains_many(keys)
        out = []
        with self._lock:
            for key, here in zip(keys, on_disk):
                if here or key in self._pending:
                    continue
                block = next((t.peek(key) for t in self.memory if t.contains(key)), None)
                if block is not None:
                    out.append((key, block))
        return out

    def _present(self, keys: list[BlockKey]) -> list[bool]:
        with self._lock:
            found = [any(t.contains(k) for t in self.memory) or k in self._pending for k in keys]
        if self.cold is not None and not all(found):
            on_disk = self.cold.contains_many(keys)
            found = [a or b for a, b in zip(found, on_disk)]
        return found

    def _place(self, key: BlockKey, block: Block, start: int, since: int | None = None) -> int:
        """Put ``block`` into the first memory tier from ``start`` down that can make room.

        :param since: for a read's promotion, the tombstone generation the read began at: a block
            erased since is not put back (:mod:`tiering.tombstones`).
        :returns: the index of the tier that took it, or -1 when none could (everything pinned, no
            memory tier, or the block was erased meanwhile).
        """
        for i in range(start, len(self.memory)):
            tier = self.memory[i]
            staged = tier.stage(block) if block.data.device != tier.device or tier.pin_memory else block
            with self._lock:
                if self._tombstones.refuses(since, key, block.ns_id):
                    return -1
                if self._insert(i, key, staged):
                    return i
        return -1

    def _insert(self, i: int, key: BlockKey, block: Block) -> bool:
        """Insert into memory tier ``i``, demoting victims. Caller holds the lock and staged the bytes."""
        tier = self.memory[i]
        if tier.contains(key):
            tier.get(key)
            return True
        if block.nbytes > tier.capacity_bytes:
            return False
        self.leases.sweep()
        victims = tier.victims(block.nbytes, self.leases.is_pinned)
        if victims is None:
            return False
        for v in victims:
            self._demote(i, v, tier.pop(v, evicted=True))
        tier.put(key, block)
        return True

    def _demote(self, i: int, key: BlockKey, block: Block) -> None:
        """Move a victim of memory tier ``i`` one tier down (caller holds the lock)."""
        src = self.memory[i]
        self.stats.tier(src.name).demotions += 1
        if i + 1 < len(self.memory):
            dst = self.memory[i + 1]
            if self._insert(i + 1, key, block if dst.contains(key) else dst.stage(block)):
                self.stats.bytes_moved[f"{src.name}->{dst.name}"] += block.nbytes
                return
        if self.config.write_policy == "write_back" and self._writer is not None and key not in self._pending:
            self._pending[key] = block
            self._writer.submit(WriteJob(blocks=[(key, block)]))
            self.stats.bytes_moved[f"{src.name}->cold"] += block.nbytes
        else:
            self.stats.tier(src.name).evictions += 1

    def _on_commit(self, jobs: list[WriteJob], evicted: list[BlockKey], error: BaseException | None) -> None:
        with self._lock:
            for job in jobs:
                for key, block in job.blocks:
                    if self._pending.get(key) is block:
                        del self._pending[key]
                    if error is None:
                        self.stats.cold_raw_bytes_written += block.nbytes
                for sid in job.sessions:
                    # Count, not compare: two deletions queued for one session are both None, so an
                    # identity check would let the first commit drop the second (and expose a record
                    # queued between them). The newest value stays until all its writes are on disk.
                    left = self._pending_session_writes.get(sid, 1) - 1
                    if left > 0:
                        self._pending_session_writes[sid] = left
                    else:
                        self._pending_session_writes.pop(sid, None)
                        self._pending_sessions.pop(sid, None)
                self.stats.cold_record_bytes_written += job.record_bytes if error is None else 0
            if error is not None:
                self.stats.write_errors += 1
            self.stats.tier("cold").evictions += len(evicted)

    # ------------------------------------------------------------------------------------------------
    # get
    def get(self, key: BlockKey, *, promote: bool = True) -> tuple[Block, str] | None:
        """The block and the tier it was served from, or ``None`` if no tier has it.

        A hit below the top tier promotes the block to the top tier (unless ``promote`` is False).
        Concurrent loads of one block from disk happen once. Bytes that fail their checksum are
        never returned (the block becomes a miss and is dropped). Under a recording span, the tier
        work becomes one ``kvtier.<tier>.read`` span per tier (see :mod:`tiering.spans`).
        """
        parent = trace.get_current_span()
        ops = TierOps(self.tracer, parent) if parent.is_recording() else None
        try:
            return self._get(key, promote, ops)
        finally:
            if ops is not None:
                ops.finish()

    def _get(self, key: BlockKey, promote: bool, ops: TierOps | None) -> tuple[Block, str] | None:
        """:meth:`get`, recording its tier work into ``ops`` (when not None)."""
        self._check_open()
        with self._lock:
            since = self._tombstones.begin_read()
        try:
            return self._get_since(key, promote, ops, since)
        finally:
            with self._lock:
                self._tombstones.end_read(since)

    def _get_since(self, key: BlockKey, promote: bool, ops: TierOps | None, since: int) -> tuple[Block, str] | None:
        """:meth:`_get` of a read that began at tombstone generation ``since`` (:mod:`tiering.tombstones`)."""
        owner = False
        t0 = now_ns() if ops is not None else 0
        with self._lock:
            for i, tier in enumerate(self.memory):
                block = tier.get(key)
                if block is not None:
                    self.stats.tier(tier.name).hits += 1
                    break
                self.stats.tier(tier.name).misses += 1
            else:
                i, block = -1, self._pending.get(key)
            if block is not None:
                served = self.memory[i].name if i >= 0 else self._pending_tier
            else:
                fut = self._inflight.get(key)
                if fut is None and self.cold is not None:
                    fut = self._inflight[key] = Future()
                    owner = True
        if ops is not None:
            t1 = now_ns()
            for tier in self.memory[:i if block is not None and i >= 0 else len(self.memory)]:
                ops.record(f"{tier.name}.read", t0, t1, hit=False)
            if block is not None:
                ops.record(f"{served}.read", t0, t1, nbytes=block.nbytes)
        if block is not None:
            if promote and i != 0 and self.memory:
                self._promote(key, block, served, ops, since)
            return block, served
        if self.cold is None:
            return None
        if not owner:
            got = fut.result()
            return None if got is None else (got, "cold")
        try:
            got = self._load_cold(key, promote, ops, since)
            fut.set_result(got)
        except BaseException as exc:
            fut.set_exception(exc)
            raise
        finally:
            with self._lock:
                if self._inflight.get(key) is fut:  # an erase may have let a newer load take the key
                    del self._inflight[key]
        return None if got is None else (got, "cold")

    def _promote(self, key: BlockKey, block: Block, src: str, ops: TierOps | None = None,
                 since: int | None = None) -> Block:
        """Put ``block`` (read from tier ``src``) into the top memory tier that takes it; a read that
        began at tombstone generation ``since`` never puts back a block erased since."""
        t0 = now_ns() if ops is not None else 0
        placed = self._place(key, block, 0, since)
        if placed < 0:
            return block
        dst = self.memory[placed]
        if ops is not None:
            t1 = now_ns()
            ops.record("promote", t0, t1, nbytes=block.nbytes, to_tier=dst.name)
            if dst.device.type == "cuda" and block.data.device.type != "cuda":
                ops.record("h2d_copy", t0, t1, nbytes=block.nbytes, to_tier=dst.name)
        with self._lock:
            if dst.name != src:
                self.stats.tier(dst.name).promotions += 1
                self.stats.bytes_moved[f"{src}->{dst.name}"] += block.nbytes
            return dst.peek(key) or block

    def _load_cold(self, key: BlockKey, promote: bool, ops: TierOps | None = None,
                   since: int | None = None) -> Block | None:
        cold = self.cold
        before = cold.checksum_failures
        got = cold.read(key, ops)
        with self._lock:
            self.stats.tier("cold").checksum_failures += cold.checksum_failures - before
            if got is None:
                self.stats.tier("cold").misses += 1
                return None
            self.stats.tier("cold").hits += 1
        block = got[0]
        if promote and self.memory:
            block = self._promote(key, block, "cold", ops, since)
        return block

    def iter_blocks(self, keys: Sequence[BlockKey], *, window: int = 4,
                    deadline: float | None = None) -> Iterator[tuple[BlockKey, Block | None, str]]:
        """Yield ``(key, block, tier)`` in prefix order, stopping after the first miss (block None).

        Up to ``window`` blocks are loaded ahead on the fetch threads, so disk reads and decompression
        overlap with the caller consuming earlier blocks. The keys are pinned for the duration.
        ``deadline`` is a ``time.monotonic()`` instant after which the iteration stops early.
        The block needed next is loaded on the calling thread when no fetch thread has started on it
        (always so for the first): a one-block iteration never waits on a thread hand-off.
        """
        self._check_open()
        keys = list(keys)
        lease = self.leases.acquire(keys, self.config.lease_s)
        with self._lock:
            self.stats.gets += 1
        parent = trace.get_current_span()
        ops = TierOps(self.tracer, parent) if parent.is_recording() else None
        futures: list[Future | None] = []
        try:
            nxt = 0
            for idx, key in enumerate(keys):
                if nxt == idx:  # not handed out: this thread loads it below
                    futures.append(None)
                    nxt += 1
                while nxt < len(keys) and nxt < idx + window:
                    futures.append(self._pool.submit(self._get, keys[nxt], True, ops))
                    nxt += 1
                if deadline is not None and time.monotonic() > deadline:
                    return
                fut = futures[idx]
                # a queued fetch is taken back and done here rather than waited for (one hand-off less)
                got = self._get(key, True, ops) if fut is None or fut.cancel() else fut.result()
                if got is None:
                    yield key, None, ""
                    return
                yield key, got[0], got[1]
        finally:
            for f in futures:
                if f is not None:
                    f.cancel()
            self.leases.release(lease)
            if ops is not None:
                ops.finish()
