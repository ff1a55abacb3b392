"""KVCacheServicer: the ``kvtier.v1.KVCache`` RPCs over one :class:`~tiering.store.TieredStore`.

May import ``service.wire``, ``service.server`` (core, chain, errors, shm_rpc, ipc, thread_iter) and ``tiering``.

Each handler validates its request (``service/wire/convert.py``, and at the door:
``service/server/door.py``), makes its store calls through ``asyncio.to_thread`` (the store blocks on
LMDB, zstd and device copies) and answers through ``convert``. No handler catches errors: the one
:class:`~service.server.errors.ErrorBoundary` maps them. What the handlers share with the same-host
data paths (``shm_rpc.py``, ``ipc.py``) is one :class:`~service.server.core.ServerCore`: the caller
check, the chain read of every Get path (``chain.py``), Put's plan and commit, the limits.

Deadlines: Get, Resume and Prefetch pass the RPC's deadline (as a ``time.monotonic()`` instant) to
the store, so background work stops when nobody waits for it any more.

Tenants: every request acts for ``convert.tenant_of(request.tenant, <tenant of its bearer token>)``
(``service/server/auth.py``). Keys named explicitly (Lookup, Get and Prefetch by keys) are cut at the
first key that is not held for that tenant, before any load: another tenant's block answers exactly
like a miss and is neither read, promoted nor pinned. ``Stats`` is the one admin RPC.

Limits (``service/server/quota.py``) are checked before the store is touched: blocks per request on every
RPC that names blocks, open Put streams per tenant and declared bytes server-wide, byte and session quotas.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from kvtier.service import __version__
from kvtier.service.server import chain, door
from kvtier.service.server import ipc as shm_ipc
from kvtier.service.server import shm_rpc
from kvtier.service.server.core import ServerCore
from kvtier.service.server.put_assembly import MAX_CHUNK_BYTES, PutAssembler
from kvtier.service.server.shm_broker import ArenaRegistry
from kvtier.service.server.auth import require_admin
from kvtier.service.server.thread_iter import ThreadedIterator
from kvtier.service.wire import convert
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.service.wire.fast import get_block_messages
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.keys import chain_keys
from kvtier.tiering.layout import blocks_for

log = logging.getLogger(__name__)

#: Blocks a Get loads ahead of the one being sent.
GET_WINDOW = 4


def deadline_of(context: grpc.aio.ServicerContext, budget_s: float | None = None) -> float | None:
    """The earlier of the RPC's deadline and ``budget_s`` from now, as a ``time.monotonic()`` instant.

    :returns: ``None`` when there is neither a deadline nor a budget.
    """
    remaining = context.time_remaining()
    limits = [s for s in (remaining, budget_s) if s is not None and math.isfinite(s) and s < 1e9]
    return time.monotonic() + min(limits) if limits else None


class KVCacheServicer(pb_grpc.KVCacheServicer):
    """The KV cache service (see ``proto/kvtier/v1/kvtier.proto`` for each RPC's contract).

    :param core: the store, limits and caller check the handlers share (:class:`ServerCore`).
    :param shm: the shared-memory arenas of same-host callers (``None``: that data path is off).
    """

    def __init__(self, core: ServerCore, *, shm: ArenaRegistry | None = None) -> None:
        self.core = core
        self.store = core.store
        self.shm = shm  # same-host arenas; None: OpenArena answers FAILED_PRECONDITION
        self.ipc = shm_ipc.IpcLeases(core.store.config.lease_s)  # CUDA IPC buffers on lease (GetIpc)

    # -- Lookup ---------------------------------------------------------------------------------------
    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        caller = self.core.caller(context)
        ns = convert.namespace_from_proto(request.namespace, tenant=caller.tenant(request.namespace.tenant))
        if request.token_ids and request.keys:
            raise InvalidBlock("give token_ids or keys, not both", field="keys")
        if not request.token_ids and not request.keys:
            raise InvalidBlock("token_ids or keys is required", field="token_ids")
        n_tokens = len(request.token_ids) if request.token_ids else None
        self.core.check_chain(len(request.keys) or blocks_for(n_tokens, ns.layout.block_tokens), "Lookup")
        keys = convert.keys_from_proto(request.keys) if request.keys else None
        tokens = list(request.token_ids)
        store = self.store
        exact_only = not request.accept_lossy

        def lookup():
            if keys is None:
                chain = chain_keys(ns, tokens)  # derived from the tenant's namespace: its own keys
                return chain, store.lookup(ns, keys=chain, exact_only=exact_only)
            owned = store.owned(keys, ns.tenant)
            mine = keys[:next((i for i, ok in enumerate(owned) if not ok), len(keys))]
            return keys, store.lookup(ns, keys=mine, exact_only=exact_only)

        chain, found = await asyncio.to_thread(lookup)
        return convert.lookup_to_proto(chain, found, n_tokens)

    # -- Put ------------------------------------------------------------------------------------------
    async def Put(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        core = self.core
        stream = aiter(request_iterator)
        first = await core.next_message(stream)
        if first is None or first.WhichOneof("msg") != "header":
            raise InvalidBlock("a Put stream starts with a header", field="header")
        plan = core.plan_put(first.header, core.caller(context))
        # the stream holds its place (one of its tenant's open Puts, its declared bytes) until it ends
        with core.puts.hold(plan.namespace.tenant, plan.declared_bytes) as arrived:
            assembler = PutAssembler(plan, alloc=core.store.hostpool.take)
            if first.HasField("first_chunk"):  # a small Put in one message (PutResponse.accepts_first_chunk)
                assembler.add(first.first_chunk)
                arrived(len(first.first_chunk.data))
            while (msg := await core.next_message(stream)) is not None:
                if msg.WhichOneof("msg") != "chunk":
                    raise InvalidBlock("only the first message of a Put stream is a header", field="header")
                assembler.add(msg.chunk)
                arrived(len(msg.chunk.data))
            # Only now, with the whole stream in hand, does anything reach the store: a broken,
            # cancelled or invalid stream stores nothing.
            result = await asyncio.to_thread(lambda: core.commit_put(plan, assembler.finish(), owned=True))
        log.debug("put: %d blocks stored, %d present, %d not admitted", len(result.stored),
                  len(result.skipped_present), len(result.skipped_not_admitted))
        resp = convert.put_result_to_proto(result)
        resp.accepts_first_chunk = True
        return resp

    # -- Get ------------------------------------------------------------------------------------------
    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext):
        tenant = self.core.caller(context).tenant(request.tenant)
        # Blocks named by key and all in host memory at the top are read on the loop: nothing to wait
        # for, so no thread hand-off (two per one-block Get otherwise, the most of a small Get's time).
        resident = chain.read_resident(self.store, self.core.limits, request, tenant)
        if resident is not None:
            read, found, tier, release = resident
            try:
                async for msg in _answer(read, _host_views(read.wanted, found, tier), request.inline_data,
                                         request.accept_lossy):
                    yield msg
            finally:
                release()
            return
        read = await self.core.read_chain(request, tenant)
        store = self.store

        def to_host(item):
            # On the worker thread: check ownership (takes the store lock) and copy device -> host.
            key, block, tier = item
            if block is not None:
                ns = store.namespace_of(block.ns_id)
                if ns is None or ns.tenant != tenant:
                    return key, None, "", None
                return key, block, tier, memoryview(block.data.cpu().numpy()).cast("B")
            return key, None, "", None

        gen = store.iter_blocks(read.wanted, window=GET_WINDOW, deadline=deadline_of(context))
        async with ThreadedIterator(gen, to_host, close_inline=True) as blocks:
            # gRPC may cancel this handler while it is suspended at a yield, where the `async with`
            # would only exit at garbage collection: release the lease when the RPC ends instead.
            context.add_done_callback(blocks.close_soon)
            async for msg in _answer(read, blocks, request.inline_data, request.accept_lossy):
                yield msg

    # -- Resume / Prefetch ----------------------------------------------------------------------------
    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext) -> pb.ResumeResponse:
        tenant = self.core.caller(context).tenant(request.tenant)
        sid = door.session_id(tenant, request.session_id)
        budget = request.prefetch_budget_ms / 1000 if request.prefetch_budget_ms else None
        store = self.store

        def resume():
            session, tiers, _handle = store.resume(tenant, sid, deadline=deadline_of(context, budget))
            # a block read back from a lossy record stays lossy: the flags hold while the prefetch runs
            ns = session.namespace
            return session, tiers, store.lookup(ns, keys=session.keys).lossy if ns.lossy else []

        session, tiers, lossy = await asyncio.to_thread(resume)
        return convert.resume_to_proto(session, tiers, lossy, exact_only=not request.accept_lossy)

    async def Prefetch(self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext) -> pb.PrefetchResponse:
        tenant = self.core.caller(context).tenant(request.tenant)
        keys, mine = await self.core.target_keys(request, tenant, "Prefetch")
        budget = request.budget_ms / 1000 if request.budget_ms else None
        # only the tenant's own prefix moves; the answer counts every key named, as for a miss
        handle = await asyncio.to_thread(self.store.prefetch, mine, deadline=deadline_of(context, budget))
        ready = await asyncio.wrap_future(handle.future) if request.wait else 0
        return pb.PrefetchResponse(blocks=len(keys), ready_blocks=ready)

    # -- DeleteSession / Invalidate -------------------------------------------------------------------
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        tenant = self.core.caller(context).tenant(request.tenant)
        sid = door.session_id(tenant, request.session_id)
        erased = await asyncio.to_thread(self.store.delete_session, tenant, sid, erase_blocks=request.erase_blocks)
        return pb.DeleteSessionResponse(blocks_erased=erased)

    async def Invalidate(self, request: pb.InvalidateRequest,
                         context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        caller = self.core.caller(context)
        which = request.WhichOneof("target")
        if which == "namespace":
            ns = convert.namespace_from_proto(request.namespace, tenant=caller.tenant(request.namespace.tenant))
            deleted = await asyncio.to_thread(self.store.invalidate, ns.tenant, namespace=ns)
        elif which == "model":
            ref = request.model
            tenant = caller.tenant(ref.tenant)
            model = convert.check_id(ref.model, "model.model")
            revision = convert.check_id(ref.revision, "model.revision", required=False) or None
            deleted = await asyncio.to_thread(self.store.invalidate, tenant, model=model, revision=revision)
        else:
            raise InvalidBlock("target is required: namespace or model", field="target")
        return pb.InvalidateResponse(blocks_deleted=deleted)

    # -- Stats ----------------------------------------------------------------------------------------
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        require_admin(self.core.caller(context).principal, "Stats")  # store-wide counters span every tenant
        snap = await asyncio.to_thread(self.store.snapshot)
        resp = convert.stats_to_proto(snap, __version__)
        resp.counters.update(self.core.puts.stats())
        if self.shm is not None:
            resp.counters.update(self.shm.stats())
            resp.counters.update(self.ipc.stats())
        return resp

    # -- same-host data plane (service/server/shm_rpc.py) ---------------------------------------------
    async def OpenArena(self, request: pb.OpenArenaRequest, context: grpc.aio.ServicerContext) -> pb.OpenArenaResponse:
        return await shm_rpc.open_arena(self.core, self.shm, request, context)

    async def PutShm(self, request: pb.PutShmRequest, context: grpc.aio.ServicerContext) -> pb.PutShmResponse:
        return await shm_rpc.put_shm(self.core, self.shm, request, self.core.caller(context))

    async def GetShm(self, request: pb.GetShmRequest, context: grpc.aio.ServicerContext) -> pb.GetShmResponse:
        return await shm_rpc.get_shm(self.core, self.shm, request, self.core.caller(context), deadline_of(context))

    # -- same-host CUDA IPC (service/server/ipc.py) ---------------------------------------------------
    async def GetIpc(self, request: pb.GetIpcRequest, context: grpc.aio.ServicerContext) -> pb.GetIpcResponse:
        return await shm_ipc.get_ipc(self.core, self.shm, self.ipc, request, context, deadline_of(context))

    async def ReleaseIpc(self, request: pb.ReleaseIpcRequest,
                         context: grpc.aio.ServicerContext) -> pb.ReleaseIpcResponse:
        return await shm_ipc.release_ipc(self.core, self.ipc, request, context)


async def _host_views(keys, blocks, tier: str):
    """``(key, block, tier, bytes)`` of blocks already in host memory, as the Get loop takes them."""
    for key, block in zip(keys, blocks):
        yield key, block, tier, memoryview(block.data.numpy()).cast("B")


async def _answer(read: chain.ChainRead, blocks, inline: bool, accept_lossy: bool):
    """The messages of a Get answer: each ``(key, block, tier, bytes)`` of ``blocks`` (in ``read.wanted``
    order) as a header and data, until the first miss (a block of ``None``, or a lossy one for an
    exact-only caller), then the ``GetEnd``; with ``inline`` the one-message forms
    (``service/wire/fast.py``: each chunk's encoding copied once from the block; the server registers
    Get with the serializer that sends these bytes as they are)."""
    sent = tokens = 0
    reason = ""
    last = None  # the GetEnd, once sent inside the last block's message
    wanted = len(read.wanted)
    async for key, block, tier, raw in blocks:
        if block is None or (block.lossy and not accept_lossy):
            reason = "miss"  # an exact-only caller never receives a lossy block's bytes
            break
        header = convert.block_header_to_proto(read.start + sent, key, block, tier)
        sent += 1
        tokens += block.tokens
        if inline and sent == wanted:
            last = read.end_message(sent, tokens)
        for msg in get_block_messages(header, raw, MAX_CHUNK_BYTES, inline=inline, last=last):
            yield msg
        if sent == wanted:
            break  # the last block: a further step would only find the end (one hand-off less)
    if last is None:
        yield pb.GetResponse(end=read.end_message(sent, tokens, reason))
