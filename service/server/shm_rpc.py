"""The shared-memory RPCs (``OpenArena``, ``PutShm``, ``GetShm``) as the servicer runs them.

:class:`service.servicer.KVCacheServicer` delegates to these functions; they use its caller check,
limits and store exactly as ``Put`` and ``Get`` do, so tenants, quotas and "a miss stops the chain"
are the same on both data paths. Only the bytes move differently, and each is one unary call in the
common case (the caller owns the arena's space and names the ranges; the server holds none):

* **PutShm**: the caller wrote the blocks into its arena and names where, with their checksums.
  ``TieredStore.put`` copies each block out of the arena into the warm tier (the one copy) and checks
  the checksum on that copy, so bytes changing under the call can never be stored unverified.
  A Put larger than the caller's arena comes in pieces: each but the last is copied out and parked
  (:class:`service.shm.broker.Upload`) until the next piece, for at most the lease time; the store
  sees the blocks only with the last piece, so an interrupted Put stores nothing.
* **GetShm**: on one worker thread, ``TieredStore.copy_out`` writes the blocks into the caller's
  region (one copy from the warm or hot tier, a device-to-host copy for a GPU block, cold blocks
  decompressed straight into it; each checked on the arena's bytes), and the answer says where. When the region fills up first the answer says so (reason ``"region"``) with
  the rest of the chain's keys, so the caller's next call reads the same chain.
"""

from __future__ import annotations

import asyncio
import logging

from kvtier.service.wire import convert
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.server.put_assembly import plan_from_header
from kvtier.tiering.errors import InvalidBlock

from kvtier.service.wire.arena import ALIGNMENT, ShmUnavailable
from kvtier.service.server.shm_broker import ArenaRegistry, ServerArena, Upload

log = logging.getLogger(__name__)



def _registry(servicer) -> ArenaRegistry:
    if servicer.shm is None:
        raise ShmUnavailable("shared memory is off on this server (server.shm_enabled = false)")
    return servicer.shm


def _range(arena: ServerArena, offset: int, length: int, field: str) -> tuple[int, int]:
    """``(offset, length)`` after checking it lies inside the arena."""
    if offset + length > arena.arena.size:
        raise InvalidBlock(f"range [{offset}, {offset + length}) is outside the {arena.arena.size}-byte arena",
                           field=field)
    return offset, length


async def open_arena(servicer, request: pb.OpenArenaRequest, context) -> pb.OpenArenaResponse:
    registry = _registry(servicer)
    principal, _ = servicer._caller(context)
    arena_id, ticket, path, size = await registry.issue(principal, request.size_bytes)
    return pb.OpenArenaResponse(arena_id=arena_id, ticket=ticket, socket_path=path, size_bytes=size,
                                alignment=ALIGNMENT)


async def put_shm(servicer, request: pb.PutShmRequest, context) -> pb.PutShmResponse:
    """``PutShm`` (module docstring)."""
    registry = _registry(servicer)
    principal, bound = servicer._caller(context)
    with registry.use(request.arena_id, principal) as arena:
        if request.upload_id:
            upload = arena.take(request.upload_id)
        else:
            plan = plan_from_header(request.header, convert.tenant_of(request.header.namespace.tenant, bound),
                                    max_bytes=servicer.max_put_bytes)
            layout = plan.namespace.layout
            servicer.limits.check_blocks(-(-len(plan.token_ids) // layout.block_tokens), "Put")
            upload = Upload(plan, [layout.block_bytes(plan.block_tokens(plan.first_block + i))
                                   for i in range(plan.block_count)])
        got = len(upload.blocks)
        if len(request.checksums) != len(request.slots):
            raise InvalidBlock(f"{len(request.checksums)} checksums for {len(request.slots)} slots", field="checksums")
        if got + len(request.slots) > len(upload.sizes) or (not request.more and got + len(request.slots)
                                                            < len(upload.sizes)):
            raise InvalidBlock(f"{got} + {len(request.slots)} blocks sent, {len(upload.sizes)} declared", field="slots")
        views = []
        for i, slot in enumerate(request.slots):
            if slot.length != upload.sizes[got + i]:
                raise InvalidBlock(f"block {upload.plan.first_block + got + i} has {slot.length} bytes; its layout "
                                   f"wants {upload.sizes[got + i]}", field="slots")
            views.append(arena.arena.view(*_range(arena, slot.offset, slot.length, "slots")))
        if request.more:
            # the caller reuses its ranges for the next piece: keep copies (verified at commit, by the store)
            upload.blocks += await asyncio.to_thread(lambda: [bytearray(v) for v in views])
            upload.checksums += request.checksums
            if not arena.alive:
                raise ShmUnavailable("the arena was closed by its owner")
            return pb.PutShmResponse(upload_id=arena.park(upload, registry.lease_s, registry.counters))
        result = await asyncio.to_thread(_commit, servicer, upload.plan, upload.blocks + views,
                                         upload.checksums + list(request.checksums))
        registry.counters["puts"] += 1
    return pb.PutShmResponse(done=convert.put_result_to_proto(result))


def _commit(servicer, plan, blocks, checksums: list[int]):
    # As Put's commit: quotas against the real byte count, then one store.put for the whole call,
    # which copies every block and checks it against its checksum before storing any.
    servicer.limits.check_put(servicer.store, plan.namespace.tenant, sum(len(b) for b in blocks),
                              plan.session_id is not None and servicer._is_new_session(plan.namespace.tenant,
                                                                                       plan.session_id))
    return servicer.store.put(plan.namespace, plan.token_ids, blocks, first_block=plan.first_block,
                              session_id=plan.session_id, durable=plan.durable, priority=plan.priority,
                              ttl_s=plan.ttl_s, checksums=checksums)


async def get_shm(servicer, request: pb.GetShmRequest, context, deadline: float | None) -> pb.GetShmResponse:
    """``GetShm`` (module docstring)."""
    registry = _registry(servicer)
    principal, bound = servicer._caller(context)
    req = request.request
    tenant = convert.tenant_of(req.tenant, bound)
    which = req.WhichOneof("target")
    if which == "keys":
        keys = convert.keys_from_proto(req.keys.keys, "keys.keys")
        if not keys:
            raise InvalidBlock("keys.keys is empty", field="keys.keys")
        servicer.limits.check_blocks(len(keys), "Get")
    elif which == "session_id":
        sid = convert.check_id(req.session_id, "session_id")
    else:
        raise InvalidBlock("target is required: keys or session_id", field="target")
    with registry.use(request.arena_id, principal) as arena:
        region = _range(arena, request.region.offset, request.region.length, "region")
        store = servicer.store

        def serve():
            # one worker thread per call: the chain (as the servicer's _target_keys resolves it), then the copies
            if which == "keys":
                owned = store.owned(keys, tenant)
                chain, readable = keys, next((i for i, ok in enumerate(owned) if not ok), len(keys))
            else:
                chain = store.get_session(tenant, sid).keys
                readable = len(chain)
            first = req.start_block
            if first > len(chain):
                raise InvalidBlock(f"start_block {first} is past the {len(chain)} blocks of the chain",
                                   field="start_block")
            end = min(len(chain), first + req.max_blocks) if req.max_blocks else len(chain)
            readable = max(first, min(end, readable))
            return chain, first, end, readable, *_fill(store, arena, region, chain[first:readable], tenant, deadline)

        chain, first, end, readable, filled, miss, next_bytes = await asyncio.to_thread(serve)
        resp = pb.GetShmResponse(blocks=[
            pb.ShmBlock(header=convert.block_header_to_proto(first + i, key, block, tier), offset=offset)
            for i, (key, block, tier, offset) in enumerate(filled)])
        stopped = first + len(filled)
        reason = ""
        if next_bytes:
            reason = "region"
            resp.rest_keys.extend(k.digest for k in chain[stopped:])
            resp.next_block_bytes = next_bytes
        elif miss or (stopped < end and stopped >= readable):
            reason = "miss"
        elif stopped < end:
            reason = "deadline"  # copy_out ends early only when the deadline passed
        elif end < len(chain):
            reason = "max_blocks"
        resp.end.CopyFrom(pb.GetEnd(blocks_sent=len(filled), complete=stopped == len(chain), stopped_at=stopped,
                                    reason=reason, tokens=sum(f[1].tokens for f in filled)))
        registry.counters["gets"] += 1
    return resp


def _fill(store, arena: ServerArena, region: tuple[int, int], keys, tenant: str, deadline: float | None):
    """Write blocks of ``keys`` (prefix order) into ``region`` with :meth:`TieredStore.copy_out` (one
    copy from memory, cold blocks decoded straight into the arena, each checked on the arena's bytes)
    until a miss, a foreign block, the deadline or a block that does not fit. Runs on one worker thread.

    :returns: ``([(key, block, tier, offset)...], missed, bytes of the block that did not fit or 0)``.
    """
    if not arena.alive:
        raise ShmUnavailable("the arena was closed by its owner")
    owners: dict[bytes, bool] = {}

    def accept(ns_id: bytes) -> bool:
        if ns_id not in owners:
            ns = store.namespace_of(ns_id)
            owners[ns_id] = ns is not None and ns.tenant == tenant
        return owners[ns_id]

    start, length = region
    got = store.copy_out(keys, arena.arena.array[start:start + length], align=ALIGNMENT, accept=accept,
                         deadline=deadline)
    items = [(key, block, tier, start + offset) for key, block, tier, offset in got.items]
    return items, got.stop == "miss", got.next_bytes
