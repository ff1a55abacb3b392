"""Ingest: a put, from payloads to placed blocks, queued writes and the session record.

Imports ``placement``, ``policies`` (priorities), ``session_records``, ``namespaces``, ``bytecopy``,
``checksum``, ``dtypes`` and
``writer`` (the job type). :func:`source` checks a payload against the layout; :func:`to_blocks`
copies and checksums the payloads to keep in one pass; :class:`Ingest` places them in the caches and
queues what the write policy sends to the durable tier, with the session record in the same job.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from opentelemetry import trace

from .bytecopy import copy_many
from .checksum import checksum
from .config import StoreConfig
from .dtypes import torch_dtype
from .errors import InvalidBlock, LayoutMismatch, TierUnavailable
from .keys import BlockKey, Namespace, chain_keys
from .namespaces import NamespaceRegistry
from .placement import HELD, Placement
from .policies import Priorities
from .results import PutResult
from .session_records import SessionRecords
from .sessions import Session, session_id_key
from .spans import session_hash
from .stats import StoreStats
from .tier import Block
from .tierlist import TierList
from .writer import WriteJob

#: ``Payload`` is what callers may hand to :meth:`TieredStore.put`: a tensor or array whose dtype and
#: shape match the layout, or raw bytes of the right length.
Payload = torch.Tensor | np.ndarray | bytes | bytearray | memoryview


def source(ns: Namespace, data: Payload, tokens: int, index: int, owned: bool) -> tuple[np.ndarray, bool]:
    """The bytes of one payload as a flat ``uint8`` array after checking them against the layout,
    and whether the store may keep that array as it is (``True``: nobody else holds it)."""
    lay = ns.layout
    shape = lay.shape(tokens)
    if isinstance(data, np.ndarray):
        if data.dtype == np.uint8 and data.ndim == 1:
            if owned and data.flags.c_contiguous and data.flags.writeable and data.nbytes == lay.block_bytes(tokens):
                return data, True  # an owned flat array (a Put's bytes in the host pool) is kept as it is
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

def _empty(nbytes: int) -> np.ndarray:
    return np.empty(nbytes, dtype=np.uint8)


def to_blocks(ns: Namespace, sources: list[tuple[np.ndarray, bool]], tokens: list[int],
              store: list[bool], verify: bool,
              alloc: Callable[[int], np.ndarray] = _empty) -> tuple[list[Block | None], list[int | None]]:
    """Blocks owning the bytes of the ``sources`` to ``store`` (``None`` for the others), and the
    XXH3-64 of every source (``None`` for one not stored when not ``verify``). Bytes not kept as
    they are get copied (into ``alloc(nbytes)``: the store's :class:`~tiering.hostpool.HostPool`) and
    checksummed in the same pass, on the copy threads (:mod:`tiering.bytecopy`)."""
    lay = ns.layout
    dsts = {i: alloc(src.nbytes) for i, ((src, keep), c) in enumerate(zip(sources, store)) if c and not keep}
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
                         lay.shape(tokens[i]), sums[i], ns.ns_id, ns.cold_codec))
    return out, sums


class Ingest:
    """Puts over ``tiers``; collaborators are the store's (see :class:`~tiering.store.TieredStore`)."""

    def __init__(self, config: StoreConfig, tiers: TierList, placement: Placement, *, lock: threading.RLock,
                 stats: StoreStats, sessions: SessionRecords, namespaces: NamespaceRegistry, tracer,
                 priorities: Priorities, after_durable=None, alloc: Callable[[int], np.ndarray] = _empty) -> None:
        self.config = config
        #: where put blocks' bytes are copied to (the store's host pool, or ``np.empty``)
        self.alloc = alloc
        #: ``after_durable(chain keys, job, session key or None)``, called once a durable put's job is
        #: committed (the fleet's synchronous write to the shared tier); its error is the put's
        self.after_durable = after_durable
        self.tiers = tiers
        self.placement = placement
        self.lock = lock
        self.stats = stats
        self.sessions = sessions
        self.namespaces = namespaces
        self.tracer = tracer
        self.priorities = priorities

    def _present(self, keys: list[BlockKey]) -> list[bool]:
        """Whether each key is held locally: by a cache or the durable tier (tiers below do not count:
        a block only there is stored again, so that this host holds it)."""
        with self.lock:
            found = [any(t.contains(k) for t in self.tiers.caches) for k in keys]
        durable = self.tiers.durable
        if durable is not None and not all(found):
            found = [a or b for a, b in zip(found, durable.contains_many(keys))]
        return found

    def put(self, namespace: Namespace, token_ids: Sequence[int] | np.ndarray, blocks: Sequence[Payload], *,
            first_block: int = 0, session_id: str | None = None, durable: bool = False, priority: int = 0,
            ttl_s: float | None = None, checksums: Sequence[int | None] | None = None,
            owned: bool = False) -> PutResult:
        """Store the KV blocks of ``token_ids`` (and, with ``session_id``, the session's chain).

        :param namespace: tenant, model, revision and layout the blocks belong to.
        :param token_ids: every token the blocks cover, from the start of the sequence.
        :param blocks: payloads of blocks ``first_block``, ``first_block+1``…; block i covers tokens
            ``[i*block_tokens, (i+1)*block_tokens)`` (the last one may be partial). Blocks before
            ``first_block`` are expected to be cached already (the client learnt that from a lookup).
        :param session_id: record ``token_ids``' key chain as this session of the tenant (replacing an
            older chain of the same session).
        :param durable: return only once the blocks and the session are committed to LMDB (and, with a
            shared remote tier, acknowledged there: see :mod:`tiering.fleet`).
        :param checksums: the XXH3-64 each payload must have (``None`` for one sent without), checked on
            the store's own copy (so a payload changing under the call, e.g. in shared memory, can never
            be stored against it). The store always checksums its own copy: what it keeps and the
            checksum it keeps with it agree, whether or not one was sent.
        :param owned: ``bytearray`` and flat writable ``uint8`` array payloads are handed over (nobody else
            holds them): the store keeps them instead of a copy. Other payloads are copied either way.
        :returns: the keys of all blocks and what happened to each block sent.
        :raises InvalidBlock: on bad sizes, counts or ids. :raises LayoutMismatch: when a tensor's
            dtype/shape disagrees with the layout. :raises CapacityExceeded: if a durable write finds
            the cold tier full. :raises TierUnavailable: if the store is closed, or durability is asked
            for without a cold tier, or (a ``RemoteWriteFailed``) the shared tier did not acknowledge
            a durable put, whose local copy stays committed. Nothing is stored when an error is raised before any block is.
        """
        keys = chain_keys(namespace, token_ids)
        n_tokens = len(token_ids)
        bt = namespace.layout.block_tokens
        if not 0 <= first_block <= len(keys) or first_block + len(blocks) > len(keys):
            raise InvalidBlock(f"{len(blocks)} blocks from index {first_block} do not fit the {len(keys)} blocks "
                               f"of {n_tokens} tokens", field="blocks")
        if durable and self.tiers.durable is None:
            raise TierUnavailable("a durable put needs the cold tier, which is off")
        sid = session_id_key(namespace.tenant, session_id) if session_id is not None else None
        if sid is not None:
            trace.get_current_span().set_attribute("kvtier.session", session_hash(sid))
        tokens = [min(bt, n_tokens - (first_block + i) * bt) for i in range(len(blocks))]
        sources = [source(namespace, data, tokens[i], first_block + i, owned) for i, data in enumerate(blocks)]
        if checksums is not None and len(checksums) != len(sources):
            raise InvalidBlock(f"{len(checksums)} checksums for {len(sources)} blocks", field="checksums")
        block_keys = keys[first_block:first_block + len(blocks)]
        admitted = n_tokens >= self.config.min_tokens
        present = self._present(block_keys) if admitted else [True] * len(block_keys)
        # A block already stored (or not admitted) is not copied, only checksummed: against the checksum
        # sent, and against the block held (same key, other bytes: a conflict, counted; first writer wins).
        built, sums = to_blocks(namespace, sources, tokens, [not here for here in present], True, self.alloc)
        if checksums is not None:
            bad = next((i for i, (got, want) in enumerate(zip(sums, checksums)) if want is not None and got != want),
                       None)
            if bad is not None:
                raise InvalidBlock(f"block {first_block + bad}: checksum {sums[bad]:#018x} of the "
                                   f"bytes differs from {checksums[bad]:#018x} sent", field="checksums")
        result = PutResult(keys)
        with self.lock:
            self.stats.puts += 1
            if sid is not None:  # before placing: this put's own demotions already respect it
                self.priorities.raise_to(keys, priority)
            if not admitted:
                result.skipped_not_admitted = list(block_keys)
                self.stats.blocks_skipped_admission += len(block_keys)
                return result
        to_disk: list[tuple[BlockKey, Block]] = []
        seen: set[BlockKey] = set()
        conflicts = 0
        with self.tracer.start_as_current_span("kvtier.store.put") as span:
            for key, block, here, csum in zip(block_keys, built, present, sums):
                placed = HELD if here or key in seen else self.placement.place(key, block, 0, new=True)
                if placed == HELD:  # first writer wins: this writer's bytes are dropped
                    result.skipped_present.append(key)
                    held = self.placement.held(key)
                    conflicts += held is not None and held.checksum != csum
                    continue
                seen.add(key)
                if self.config.write_policy == "write_through" or durable or placed < 0:
                    to_disk.append((key, block))
                result.stored.append(key)
            span.set_attribute("kvtier.blocks", len(result.stored))
            span.set_attribute("kvtier.bytes", sum(src.nbytes for src, _ in sources))
        with self.lock:
            self.stats.blocks_stored += len(result.stored)
            self.stats.blocks_skipped_present += len(result.skipped_present)
            self.stats.put_conflicts += conflicts
        new_ns = self.namespaces.register(namespace)
        if durable and (result.skipped_present or first_block):
            # Durable covers the whole chain the session names, not just the blocks sent: blocks before
            # first_block (sent by earlier, non-durable puts) may still be in memory only (write_back).
            to_disk += self.placement.held_only_in_caches(keys[:first_block] + result.skipped_present)
        job = WriteJob(blocks=to_disk, namespaces=new_ns, durable=durable, acknowledged=not durable)
        if sid is not None:
            now = time.time()
            ttl_s = ttl_s if ttl_s is not None else self.config.session_ttl_s

            def record(old: Session | None) -> Session:  # read-modify-write: atomic against resume's touch
                return Session(namespace.tenant, session_id, namespace, keys, n_tokens,
                               created=old.created if old else now, last_used=now, priority=priority, ttl_s=ttl_s)

            self.sessions.update(sid, record, job)
        # A durable put always waits for a job: jobs commit in order, so blocks it skipped because an
        # earlier put had queued them are on disk once its own (maybe empty) job is.
        durable_tier = self.tiers.durable
        if durable_tier is not None and (job.blocks or job.sessions or job.namespaces or durable):
            fut = durable_tier.submit(job)
            if durable:
                fut.result()
                if self.after_durable is not None:
                    self.after_durable(keys, job, sid)
        return result
