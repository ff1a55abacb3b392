"""KVCacheServicer: the ``kvtier.v1.KVCache`` RPCs over one :class:`~tiering.store.TieredStore`.

Each handler validates its request (via ``service/convert.py``), makes its store calls through
``asyncio.to_thread`` (the store blocks on LMDB, zstd and device copies) and answers through
``convert``. No handler catches errors: :func:`service.errors.grpc_errors` maps them, once.

Deadlines: Get, Resume and Prefetch pass the RPC's deadline (as a ``time.monotonic()`` instant) to
the store, so background work stops when nobody waits for it any more.

Tenants: every request acts for ``convert.tenant_of(request.tenant)``; a Get by keys serves only
blocks whose namespace belongs to that tenant (another tenant's block reads as a miss).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time

import grpc

import service
from service import convert
from service._gen.kvtier.v1 import kvtier_pb2 as pb
from service._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from service.errors import grpc_errors
from service.put_stream import MAX_CHUNK_BYTES, PutAssembler, plan_from_header
from service.thread_iter import ThreadedIterator
from tiering.errors import InvalidBlock
from tiering.keys import BlockKey, chain_keys
from tiering.store import TieredStore

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
    """

    def __init__(self, store: TieredStore) -> None:
        self.store = store

    async def _target_keys(self, request, tenant: str) -> list[BlockKey]:
        """Keys named by a ``target`` oneof: explicit keys, or the chain of the tenant's session."""
        which = request.WhichOneof("target")
        if which == "keys":
            keys = convert.keys_from_proto(request.keys.keys, "keys.keys")
            if not keys:
                raise InvalidBlock("keys.keys is empty", field="keys.keys")
            return keys
        if which == "session_id":
            sid = convert.check_id(request.session_id, "session_id")
            session = await asyncio.to_thread(self.store.get_session, tenant, sid)
            return session.keys
        raise InvalidBlock("target is required: keys or session_id", field="target")

    # -- Lookup ---------------------------------------------------------------------------------------
    @grpc_errors
    async def Lookup(self, request: pb.LookupRequest, context: grpc.aio.ServicerContext) -> pb.LookupResponse:
        ns = convert.namespace_from_proto(request.namespace)
        if request.token_ids and request.keys:
            raise InvalidBlock("give token_ids or keys, not both", field="keys")
        if not request.token_ids and not request.keys:
            raise InvalidBlock("token_ids or keys is required", field="token_ids")
        n_tokens = len(request.token_ids) if request.token_ids else None
        keys = convert.keys_from_proto(request.keys) if request.keys else None
        tokens = list(request.token_ids)

        def lookup():
            chain = keys if keys is not None else chain_keys(ns, tokens)
            return chain, self.store.lookup(ns, keys=chain)

        chain, found = await asyncio.to_thread(lookup)
        cached_tokens = found.tokens if n_tokens is None else min(found.tokens, n_tokens)
        return pb.LookupResponse(cached_tokens=cached_tokens, cached_blocks=found.blocks,
                                 tiers=convert.tiers_to_proto(found.tiers), keys=convert.keys_to_proto(chain))

    # -- Put ------------------------------------------------------------------------------------------
    @grpc_errors
    async def Put(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.PutResponse:
        stream = aiter(request_iterator)
        first = await anext(stream, None)
        if first is None or first.WhichOneof("msg") != "header":
            raise InvalidBlock("a Put stream starts with a header", field="header")
        header = first.header
        plan = plan_from_header(header, convert.tenant_of(header.namespace.tenant))
        assembler = PutAssembler(plan)
        async for msg in stream:
            if msg.WhichOneof("msg") != "chunk":
                raise InvalidBlock("only the first message of a Put stream is a header", field="header")
            assembler.add(msg.chunk)

        # Only now, with the whole stream in hand, does anything reach the store: a broken, cancelled
        # or invalid stream stores nothing.
        def commit():
            blocks = assembler.finish()
            return self.store.put(plan.namespace, plan.token_ids, blocks, first_block=plan.first_block,
                                  session_id=plan.session_id, durable=plan.durable, priority=plan.priority,
                                  ttl_s=plan.ttl_s)

        result = await asyncio.to_thread(commit)
        log.debug("put: %d blocks stored, %d present, %d not admitted", len(result.stored),
                  len(result.skipped_present), len(result.skipped_not_admitted))
        return convert.put_result_to_proto(result)

    # -- Get ------------------------------------------------------------------------------------------
    @grpc_errors
    async def Get(self, request: pb.GetRequest, context: grpc.aio.ServicerContext):
        tenant = convert.tenant_of(request.tenant)
        chain = await self._target_keys(request, tenant)
        start = request.start_block
        if start > len(chain):
            raise InvalidBlock(f"start_block {start} is past the {len(chain)} blocks of the chain",
                               field="start_block")
        end = min(len(chain), start + request.max_blocks) if request.max_blocks else len(chain)
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
        gen = store.iter_blocks(chain[start:end], window=GET_WINDOW, deadline=deadline_of(context))
        async with ThreadedIterator(gen, to_host) as blocks:
            # gRPC may cancel this handler while it is suspended at a yield, where the `async with`
            # would only exit at garbage collection: release the lease when the RPC ends instead.
            context.add_done_callback(blocks.close_soon)
            async for key, block, tier, raw in blocks:
                if block is None:
                    reason = "miss"
                    break
                yield pb.GetResponse(header=convert.block_header_to_proto(start + sent, key, block, tier))
                for off in range(0, len(raw), MAX_CHUNK_BYTES):
                    yield pb.GetResponse(data=bytes(raw[off:off + MAX_CHUNK_BYTES]))
                sent += 1
                tokens += block.tokens
        stopped = start + sent
        if not reason and stopped < end:
            reason = "deadline"  # iter_blocks ends early only when the deadline passed
        elif not reason and end < len(chain):
            reason = "max_blocks"
        yield pb.GetResponse(end=pb.GetEnd(blocks_sent=sent, complete=stopped == len(chain), stopped_at=stopped,
                                           reason=reason, tokens=tokens))

    # -- Resume / Prefetch ----------------------------------------------------------------------------
    @grpc_errors
    async def Resume(self, request: pb.ResumeRequest, context: grpc.aio.ServicerContext) -> pb.ResumeResponse:
        tenant = convert.tenant_of(request.tenant)
        sid = convert.check_id(request.session_id, "session_id")
        budget = request.prefetch_budget_ms / 1000 if request.prefetch_budget_ms else None
        session, tiers, _handle = await asyncio.to_thread(self.store.resume, tenant, sid,
                                                          deadline=deadline_of(context, budget))
        return convert.resume_to_proto(session, tiers)

    @grpc_errors
    async def Prefetch(self, request: pb.PrefetchRequest, context: grpc.aio.ServicerContext) -> pb.PrefetchResponse:
        tenant = convert.tenant_of(request.tenant)
        keys = await self._target_keys(request, tenant)
        budget = request.budget_ms / 1000 if request.budget_ms else None
        handle = await asyncio.to_thread(self.store.prefetch, keys, deadline=deadline_of(context, budget))
        ready = await asyncio.wrap_future(handle.future) if request.wait else 0
        return pb.PrefetchResponse(blocks=len(keys), ready_blocks=ready)

    # -- DeleteSession / Invalidate -------------------------------------------------------------------
    @grpc_errors
    async def DeleteSession(self, request: pb.DeleteSessionRequest,
                            context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        tenant = convert.tenant_of(request.tenant)
        sid = convert.check_id(request.session_id, "session_id")
        erased = await asyncio.to_thread(self.store.delete_session, tenant, sid, erase_blocks=request.erase_blocks)
        return pb.DeleteSessionResponse(blocks_erased=erased)

    @grpc_errors
    async def Invalidate(self, request: pb.InvalidateRequest,
                         context: grpc.aio.ServicerContext) -> pb.InvalidateResponse:
        which = request.WhichOneof("target")
        if which == "namespace":
            ns = convert.namespace_from_proto(request.namespace)
            deleted = await asyncio.to_thread(self.store.invalidate, ns.tenant, namespace=ns)
        elif which == "model":
            ref = request.model
            tenant = convert.tenant_of(ref.tenant)
            model = convert.check_id(ref.model, "model.model")
            revision = convert.check_id(ref.revision, "model.revision", required=False) or None
            deleted = await asyncio.to_thread(self.store.invalidate, tenant, model=model, revision=revision)
        else:
            raise InvalidBlock("target is required: namespace or model", field="target")
        return pb.InvalidateResponse(blocks_deleted=deleted)

    # -- Stats ----------------------------------------------------------------------------------------
    @grpc_errors
    async def Stats(self, request: pb.StatsRequest, context: grpc.aio.ServicerContext) -> pb.StatsResponse:
        snap = await asyncio.to_thread(self.store.snapshot)
        return convert.stats_to_proto(snap, service.__version__)
