"""KVCacheServicer: the ``kvtier.v1.KVCache`` RPCs over one :class:`~tiering.store.TieredStore`.

Each handler validates its request (via ``service/wire/convert.py``), makes its store calls through
``asyncio.to_thread`` (the store blocks on LMDB, zstd and device copies) and answers through
``convert``. No handler catches errors: :func:`service.errors.grpc_errors` maps them, once.

Deadlines: Get, Resume and Prefetch pass the RPC's deadline (as a ``time.monotonic()`` instant) to
the store, so background work stops when nobody waits for it any more.

Tenants: every request acts for ``convert.tenant_of(request.tenant, <tenant of its bearer token>)``
(``service/server/auth.py``). Keys named explicitly (Lookup, Get and Prefetch by keys) are cut at the first
key that is not held for that tenant, before any load: another tenant's block answers exactly like
a miss and is neither read, promoted nor pinned. ``Stats`` is the one admin RPC.

Limits (``service/server/quota.py``) are checked before the store is touched: blocks per request on every
RPC that names blocks, byte and session quotas on Put.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

from kvtier.service import __version__
from kvtier.service.wire import convert
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.service.server.auth import Authenticator, Principal, require_admin
from kvtier.service.server.errors import grpc_errors
from kvtier.service.server.quota import Limits
from kvtier.service.server import ipc as shm_ipc
from kvtier.service.server import shm_rpc
from kvtier.service.server.shm_broker import ArenaRegistry
from kvtier.service.server.put_assembly import MAX_CHUNK_BYTES, PutAssembler, plan_from_header
from kvtier.service.server.thread_iter import ThreadedIterator
from kvtier.service.wire.fast import encode_get_data
from kvtier.tiering.errors import InvalidBlock, SessionNotFound
from kvtier.tiering.keys import BlockKey, chain_keys
from kvtier.tiering.store import TieredStore

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

    :param store: the engine; the servicer never closes it (the server's shutdown does).
    :param max_put_bytes: payload bytes one Put may declare (0 = no limit; see ``ServerSettings``).
    :param auth: who may call (no tokens: everyone, as the tenant the request names).
    :param limits: per-request and per-tenant limits (none when omitted).
    :param shm: the shared-memory arenas of same-host callers (``None``: that data path is off).
    """

    def __init__(self, store: TieredStore, *, max_put_bytes: int = 0, auth: Authenticator | None = None,
                 limits: Limits | None = None, shm: ArenaRegistry | None = None) -> None:
        self.store = store
        self.max_put_bytes = max_put_bytes
        self.auth = auth or Authenticator()
        self.limits = limits or Limits()
        self.shm = shm  # same-host arenas (service/shm); None: OpenArena answers FAILED_PRECONDITION
        self.ipc = shm_ipc.IpcLeases(store.config.lease_s)  # CUDA IPC buffers on lease (GetIpc)

    def _caller(self, context: grpc.aio.ServicerContext) -> tuple[Principal | None, str | None]:
        """The caller and the tenant its credentials bind it to (None: it may name one).

        :raises Unauthenticated: when tokens are configured and the call has none, or an unknown one.
        """
        principal = self.auth.authenticate(context.invocation_metadata())
        return principal, principal.tenant if principal is not None else None

    async def _owned_prefix(self, keys: list[BlockKey], tenant: str) -> list[BlockKey]:
        """``keys`` up to (without) the first one not held for ``tenant``: what a miss would leave."""
        owned = await asyncio.to_thread(self.store.owned, keys, tenant)
        return keys[:next((i for i, ok in enumerate(owned) if not ok), len(keys))]

    async def _target_keys(self, request, tenant: str, rpc: str) -> tuple[list[BlockKey], list[BlockKey]]:
        """Keys named by a ``target`` oneof (explicit keys, or the chain of the tenant's session), and
        the prefix of them the tenant may touch (all of a session's chain, which is its own)."""
        which = request.WhichOneof("target")
        if which == "keys":
            keys = convert.keys_from_proto(request.keys.keys, "keys.keys")
            if not keys:
                raise InvalidBlock("keys.keys is empty", field="keys.keys")
            self.limits.check_blocks(len(keys), rpc)
            return keys, await self._owned_prefix(keys, tenant)
        if which == "session_id":
            sid = convert.check_id(request.session_id, "session_id")
            session = await asyncio.to_thread(self.store.get_session, tenant, sid)
            return session.keys, session.keys
        raise InvalidBlock("target is required: keys or session_id", field="target")

    # -- Lookup ---------------------------------------------------------------------------------------
    @grpc_errors
    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        _, bound = self._caller(context)
        ns = convert.namespace_from_proto(request.namespace,
                                          tenant=convert.tenant_of(request.namespace.tenant, bound))
        if request.token_ids and request.keys:
            raise InvalidBlock("give token_ids or keys, not both", field="keys")
        if not request.token_ids and not request.keys:
            raise InvalidBlock("token_ids or keys is required", field="token_ids")
        n_tokens = len(request.token_ids) if request.token_ids else None
        self.limits.check_blocks(len(request.keys) or -(-n_tokens // ns.layout.block_tokens), "Lookup")
        keys = convert.keys_from_proto(request.keys) if request.keys else None
        tokens = list(request.token_ids)

        def lookup():
            if keys is None:
                chain = chain_keys(ns, tokens)  # derived from the tenant's namespace: its own keys
                return chain, self.store.lookup(ns, keys=chain)
            owned = self.store.owned(keys, ns.tenant)
            mine = keys[:next((i for i, ok in enumerate(owned) if not ok), len(keys))]
            return keys, self.store.lookup(ns, keys=mine)

        chain, found = await asyncio.to_thread(lookup)
        return convert.lookup_to_proto(chain, found, n_tokens)

    # -- Put ------------------------------------------------------------------------------------------
    @grpc_errors
    async def Put(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        stream = aiter(request_iterator)
        first = await anext(stream, None)
        if first is None or first.WhichOneof("msg") != "header":
            raise InvalidBlock("a Put stream starts with a header", field="header")
        header = first.header
        _, bound = self._caller(context)
        plan = plan_from_header(header, convert.tenant_of(header.namespace.tenant, bound),
                                max_bytes=self.max_put_bytes)
        self.limits.check_blocks(-(-len(plan.token_ids) // plan.namespace.layout.block_tokens), "Put")
        assembler = PutAssembler(plan)
        async for msg in stream:
            if msg.WhichOneof("msg") != "chunk":
                raise InvalidBlock("only the first message of a Put stream is a header", field="header")
            assembler.add(msg.chunk)

        # Only now, with the whole stream in hand, does anything reach the store: a broken, cancelled
        # or invalid stream stores nothing.
        def commit():
            blocks = assembler.finish()
            self.limits.check_put(self.store, plan.namespace.tenant, sum(len(b) for b in blocks),
                                  plan.session_id is not None and self._is_new_session(plan.namespace.tenant,
                                                                                       plan.session_id))
            return self.store.put(plan.namespace, plan.token_ids, blocks, first_block=plan.first_block,
                                  session_id=plan.session_id, durable=plan.durable, priority=plan.priority,
                                  ttl_s=plan.ttl_s, owned=True)  # the assembler's buffers: no copy

        result = await asyncio.to_thread(commit)
        log.debug("put: %d blocks stored, %d present, %d not admitted", len(result.stored),
                  len(result.skipped_present), len(result.skipped_not_admitted))
        return convert.put_result_to_proto(result)

    def _is_new_session(self, tenant: str, session_id: str) -> bool:
        if not self.limits.max_sessions_per_tenant:
            return False
        try:
            self.store.get_session(tenant, session_id)
        except SessionNotFound:
            return True
        return False

    # -- Get ------------------------------------------------------------------------------------------
    @grpc_errors
    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext):
        _, bound = self._caller(context)
        tenant = convert.tenant_of(request.tenant, bound)
        chain, mine = await self._target_keys(request, tenant, "Get")
        start = request.start_block
        if start > len(chain):
            raise InvalidBlock(f"start_block {start} is past the {len(chain)} blocks of the chain",
                               field="start_block")
        end = min(len(chain), start + request.max_blocks) if request.max_blocks else len(chain)
        readable = max(start, min(end, len(mine)))  # blocks from here on answer as a miss: never loaded
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

        sent = tokens = 0
        reason = ""
        gen = store.iter_blocks(chain[start:readable], window=GET_WINDOW, deadline=deadline_of(context))
        async with ThreadedIterator(gen, to_host, close_inline=True) as blocks:
            # gRPC may cancel this handler while it is suspended at a yield, where the `async with`
            # would only exit at garbage collection: release the lease when the RPC ends instead.
            context.add_done_callback(blocks.close_soon)
            async for key, block, tier, raw in blocks:
                if block is None:
                    reason = "miss"
                    break
                yield pb.GetResponse(header=convert.block_header_to_proto(start + sent, key, block, tier))
                for off in range(0, len(raw), MAX_CHUNK_BYTES):
                    # the chunk's GetResponse encoding, copied once from the block (service/wire/fast.py;
                    # the server registers Get with the serializer that sends these bytes as they are)
                    yield encode_get_data(raw[off:off + MAX_CHUNK_BYTES])
                sent += 1
                tokens += block.tokens
                if start + sent == readable:
                    break  # the last block: a further step would only find the end (one hand-off less)
        stopped = start + sent
        if not reason and stopped < end:
            # iter_blocks ends early only when the deadline passed, or at a foreign key (a miss)
            reason = "miss" if stopped >= readable else "deadline"
        elif not reason and end < len(chain):
            reason = "max_blocks"
        yield pb.GetResponse(end=pb.GetEnd(blocks_sent=sent, complete=stopped == len(chain), stopped_at=stopped,
                                           reason=reason, tokens=tokens))

    # -- Resume / Prefetch ----------------------------------------------------------------------------
    @grpc_errors
    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext) -> pb.ResumeResponse:
        _, bound = self._caller(context)
        tenant = convert.tenant_of(request.tenant, bound)
        sid = convert.check_id(request.session_id, "session_id")
        budget = request.prefetch_budget_ms / 1000 if request.prefetch_budget_ms else None
        session, tiers, _handle = await asyncio.to_thread(self.store.resume, tenant, sid,
                                                          deadline=deadline_of(context, budget))
        return convert.resume_to_proto(session, tiers)

    @grpc_errors
    async def Prefetch(self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext) -> pb.PrefetchResponse:
        _, bound = self._caller(context)
        tenant = convert.tenant_of(request.tenant, bound)
        keys, mine = await self._target_keys(request, tenant, "Prefetch")
        budget = request.budget_ms / 1000 if request.budget_ms else None
        # only the tenant's own prefix moves; the answer counts every key named, as for a miss
        handle = await asyncio.to_thread(self.store.prefetch, mine, deadline=deadline_of(context, budget))
        ready = await asyncio.wrap_future(handle.future) if request.wait else 0
        return pb.PrefetchResponse(blocks=len(keys), ready_blocks=ready)

    # -- DeleteSession / Invalidate -------------------------------------------------------------------
    @grpc_errors
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        _, bound = self._caller(context)
        tenant = convert.tenant_of(request.tenant, bound)
        sid = convert.check_id(request.session_id, "session_id")
        erased = await asyncio.to_thread(self.store.delete_session, tenant, sid, erase_blocks=request.erase_blocks)
        return pb.DeleteSessionResponse(blocks_erased=erased)

    @grpc_errors
    async def Invalidate(self, request: pb.InvalidateRequest,
                         context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        _, bound = self._caller(context)
        which = request.WhichOneof("target")
        if which == "namespace":
            ns = convert.namespace_from_proto(request.namespace,
                                              tenant=convert.tenant_of(request.namespace.tenant, bound))
            deleted = await asyncio.to_thread(self.store.invalidate, ns.tenant, namespace=ns)
        elif which == "model":
            ref = request.model
            tenant = convert.tenant_of(ref.tenant, bound)
            model = convert.check_id(ref.model, "model.model")
            revision = convert.check_id(ref.revision, "model.revision", required=False) or None
            deleted = await asyncio.to_thread(self.store.invalidate, tenant, model=model, revision=revision)
        else:
            raise InvalidBlock("target is required: namespace or model", field="target")
        return pb.InvalidateResponse(blocks_deleted=deleted)

    # -- Stats ----------------------------------------------------------------------------------------
    @grpc_errors
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        principal, _ = self._caller(context)
        require_admin(principal, "Stats")  # store-wide counters and usage span every tenant
        snap = await asyncio.to_thread(self.store.snapshot)
        resp = convert.stats_to_proto(snap, __version__)
        if self.shm is not None:
            resp.counters.update(self.shm.stats())
            resp.counters.update(self.ipc.stats())
        return resp

    # -- same-host data plane (service/server/shm_rpc.py) ----------------------------------------------------
    @grpc_errors
    async def OpenArena(self, request: pb.OpenArenaRequest, context: grpc.aio.ServicerContext) -> pb.OpenArenaResponse:
        return await shm_rpc.open_arena(self, request, context)

    @grpc_errors
    async def PutShm(self, request: pb.PutShmRequest, context: grpc.aio.ServicerContext) -> pb.PutShmResponse:
        return await shm_rpc.put_shm(self, request, context)

    @grpc_errors
    async def GetShm(self, request: pb.GetShmRequest, context: grpc.aio.ServicerContext) -> pb.GetShmResponse:
        return await shm_rpc.get_shm(self, request, context, deadline_of(context))

    # -- same-host CUDA IPC (service/server/ipc.py) ------------------------------------------------------
    @grpc_errors
    async def GetIpc(self, request: pb.GetIpcRequest, context: grpc.aio.ServicerContext) -> pb.GetIpcResponse:
        return await shm_ipc.get_ipc(self, request, context, deadline_of(context))

    @grpc_errors
    async def ReleaseIpc(self, request: pb.ReleaseIpcRequest,
                         context: grpc.aio.ServicerContext) -> pb.ReleaseIpcResponse:
        return await shm_ipc.release_ipc(self, request, context)
