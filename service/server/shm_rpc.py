"""The shared-memory RPCs (``OpenArena``, ``PutShm``, ``GetShm``) as the servicer runs them.

May import ``service.wire``, ``service.server`` (core, errors, offload, shm_broker) and ``tiering``.

:class:`service.server.servicer.KVCacheServicer` delegates to these functions; they use the same
:class:`~service.server.core.ServerCore` as ``Put`` and ``Get`` (caller check, limits, the chain
read, Put's plan and commit), so tenants, quotas and "a miss stops the chain" are the same on both
data paths. Only the bytes move differently, and each is one unary call in the
common case (the caller owns the arena's space and names the ranges; the server holds none):

* **PutShm**: the caller wrote the blocks into its arena and names where, with their checksums or
  none (a caller that produced the blocks in its arena does not hash them: ``checksums`` empty).
  ``TieredStore.put`` copies each block out of the arena into the warm tier (the one copy) and
  checksums that copy, checking it against the checksum sent if any: what is stored and its checksum
  always agree, and bytes changing under the call are never stored against a checksum sent.
  A Put larger than the caller's arena comes in pieces: each but the last is copied out and parked
  (:class:`service.server.shm_broker.Upload`) until the next piece, for at most the lease time; the store
  sees the blocks only with the last piece, so an interrupted Put stores nothing. While parked, an
  upload counts as an open Put of its tenant, its declared bytes against the server's Put budget
  (``service/server/quota.py``), as a Put stream does.
* **GetShm**: on one worker thread, ``TieredStore.copy_out`` writes the blocks into the caller's
  region (one copy from the warm or hot tier, a device-to-host copy for a GPU block, cold blocks
  decompressed straight into it; each checked on the arena's bytes), and the answer says where. When the region fills up first the answer says so (reason ``"region"``) with
  the rest of the chain's keys, so the caller's next call reads the same chain.
  With a ``destination`` instead of a region (the caller's attention-cache tensors, layer-major),
  ``TieredStore.scatter_out`` writes each block at its tokens, checked on the bytes written there: a
  block whose namespace layout is not the destination's geometry is ``INVALID_ARGUMENT`` (field
  ``destination``), a block failing its check ``DATA_LOSS`` (the caller gets no block of the answer).
"""

from __future__ import annotations

import asyncio
import logging

from kvtier.service.server import offload
from kvtier.service.server.core import Caller, ServerCore
from kvtier.service.server.errors import DataLoss, ShmUnavailable
from kvtier.service.server.shm_broker import ArenaRegistry, ServerArena, Upload
from kvtier.service.wire import convert
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire.arena import ALIGNMENT
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.layout import DTYPES, MAX_DIM, itemsize
from kvtier.tiering.scatter import KVDest

log = logging.getLogger(__name__)


def _registry(shm: ArenaRegistry | None) -> ArenaRegistry:
    if shm is None:
        raise ShmUnavailable("shared memory is off on this server (server.shm_enabled = false)")
    return shm


def _range(arena: ServerArena, offset: int, length: int, field: str) -> tuple[int, int]:
    """``(offset, length)`` after checking it lies inside the arena."""
    if offset + length > arena.arena.size:
        raise InvalidBlock(f"range [{offset}, {offset + length}) is outside the {arena.arena.size}-byte arena",
                           field=field)
    return offset, length


def caller_key(caller, context) -> str:
    """Whom an arena counts against: the authenticated tenant (or admin), else the gRPC peer (one
    connection: without tokens the server knows no better)."""
    principal = caller.principal
    if principal is not None:
        return "admin" if principal.tenant is None else f"tenant:{principal.tenant}"
    return f"peer:{context.peer()}"


async def open_arena(core: ServerCore, shm: ArenaRegistry | None, request: pb.OpenArenaRequest,
                     context) -> pb.OpenArenaResponse:
    registry = _registry(shm)
    caller = core.caller(context)
    arena_id, ticket, path, size = await registry.issue(caller.principal, request.size_bytes,
                                                        caller=caller_key(caller, context))
    return pb.OpenArenaResponse(arena_id=arena_id, ticket=ticket, socket_path=path, size_bytes=size,
                                alignment=ALIGNMENT, control=registry.control, prefault=registry.prefault)


async def put_shm(core: ServerCore, shm: ArenaRegistry | None, request: pb.PutShmRequest,
                  caller: Caller) -> pb.PutShmResponse:
    """``PutShm`` (module docstring), for ``caller`` (``core.caller`` of a gRPC call, or the arena's owner
    on the same-host socket: ``service/server/shm_control.py``)."""
    registry = _registry(shm)
    with registry.use(request.arena_id, caller.principal) as arena:
        if request.upload_id:
            upload = arena.take(request.upload_id)
        else:
            plan = core.plan_put(request.header, caller)
            layout = plan.namespace.layout
            upload = Upload(plan, [layout.block_bytes(plan.block_tokens(plan.first_block + i))
                                   for i in range(plan.block_count)])
        parked = False
        try:
            views = _pieces(arena, upload, request)
            sums = list(request.checksums) or [None] * len(views)  # None: the store checksums its copy
            if request.more:
                if upload.hold is None:
                    # its copies stay here between calls: an open Put, counted as a Put stream is
                    upload.hold = core.puts.reserve(upload.plan.namespace.tenant, upload.plan.declared_bytes)
                # the caller reuses its ranges for the next piece: keep copies (verified at commit, by the store)
                upload.blocks += await asyncio.to_thread(lambda: [bytearray(v) for v in views])
                upload.hold.arrived(sum(len(v) for v in views))
                upload.checksums += sums
                if not arena.alive:
                    raise ShmUnavailable("the arena was closed by its owner")
                upload_id = arena.park(upload, registry.lease_s, registry.counters)
                parked = True
                return pb.PutShmResponse(upload_id=upload_id)
            # one store.put for the whole Put, which copies every block and checks it against its checksum
            # before storing any
            sums = upload.checksums + sums
            result = await asyncio.to_thread(core.commit_put, upload.plan, upload.blocks + views,
                                             checksums=None if all(c is None for c in sums) else sums)
        finally:
            if not parked:
                upload.release()
        registry.counters["puts"] += 1
    return pb.PutShmResponse(done=convert.put_result_to_proto(result))


def _pieces(arena: ServerArena, upload: Upload, request: pb.PutShmRequest) -> list[memoryview]:
    """Views of the blocks one ``PutShm`` call names, after checking them against the upload's plan.

    :raises InvalidBlock: on a count, size or range that does not match (``checksums``: one per slot, or none).
    """
    got = len(upload.blocks)
    if request.checksums and len(request.checksums) != len(request.slots):
        raise InvalidBlock(f"{len(request.checksums)} checksums for {len(request.slots)} slots (send one per "
                           "slot, or none)", field="checksums")
    if got + len(request.slots) > len(upload.sizes) or (not request.more and got + len(request.slots)
                                                        < len(upload.sizes)):
        raise InvalidBlock(f"{got} + {len(request.slots)} blocks sent, {len(upload.sizes)} declared", field="slots")
    views = []
    for i, slot in enumerate(request.slots):
        if slot.length != upload.sizes[got + i]:
            raise InvalidBlock(f"block {upload.plan.first_block + got + i} has {slot.length} bytes; its layout "
                               f"wants {upload.sizes[got + i]}", field="slots")
        views.append(arena.arena.view(*_range(arena, slot.offset, slot.length, "slots")))
    return views


async def get_shm(core: ServerCore, shm: ArenaRegistry | None, request: pb.GetShmRequest, caller: Caller,
                  deadline: float | None) -> pb.GetShmResponse:
    """``GetShm`` (module docstring), for ``caller`` (as :func:`put_shm`)."""
    registry = _registry(shm)
    tenant = caller.tenant(request.request.tenant)
    with registry.use(request.arena_id, caller.principal) as arena:  # first: a stranger learns nothing more
        if request.HasField("destination"):
            target = _destination(arena, request.destination)
        else:
            target = _range(arena, request.region.offset, request.region.length, "region")
        read = await core.read_chain(request.request, tenant)
        filled, miss, next_bytes = await offload.run(_fill, core.store, arena, target, read.wanted, tenant,
                                                           deadline, not request.request.accept_lossy)
        scatter = isinstance(target[1], KVDest)  # `place`: the block's first token there, else its offset
        resp = pb.GetShmResponse(blocks=[
            pb.ShmBlock(header=convert.block_header_to_proto(read.start + i, key, block, tier),
                        offset=target[0] if scatter else place, first_token=place if scatter else 0)
            for i, (key, block, tier, place) in enumerate(filled)])
        reason = "region" if next_bytes else "miss" if miss else ""
        if next_bytes:
            resp.rest_keys.extend(read.rest(len(filled)))
            resp.next_block_bytes = next_bytes
        resp.end.CopyFrom(read.end_message(len(filled), sum(f[1].tokens for f in filled), reason))
        registry.counters["gets"] += 1
    return resp


def _destination(arena: ServerArena, d: pb.ShmKVDestination) -> tuple[int, KVDest]:
    """The arena's bytes a ``ShmKVDestination`` names, as a :class:`KVDest`, after checking them.

    :raises InvalidBlock: (field ``destination`` or ``destination.<name>``) for an unknown dtype, a
        dimension out of range, a first token past the capacity, an unaligned offset or a range
        outside the arena.
    """
    if d.dtype not in DTYPES:
        raise InvalidBlock(f"unknown dtype {d.dtype!r}; expected one of {', '.join(DTYPES)}",
                           field="destination.dtype")
    for name in ("capacity_tokens", "layers", "kv_heads", "head_dim"):
        if not 1 <= getattr(d, name) <= (1 << 24 if name == "capacity_tokens" else MAX_DIM):
            raise InvalidBlock(f"{name} {getattr(d, name)} is out of range", field=f"destination.{name}")
    if d.first_token >= d.capacity_tokens:
        raise InvalidBlock(f"first token {d.first_token} is not below the capacity {d.capacity_tokens}",
                           field="destination.first_token")
    if d.offset % ALIGNMENT:
        raise InvalidBlock(f"offset {d.offset} is not a multiple of {ALIGNMENT}", field="destination.offset")
    row = d.head_dim * itemsize(d.dtype)
    shape = (2, d.layers, d.kv_heads, d.capacity_tokens, row)
    start, length = _range(arena, d.offset, 2 * d.layers * d.kv_heads * d.capacity_tokens * row, "destination")
    return start, KVDest(arena.arena.array[start:start + length].reshape(shape), d.dtype, d.first_token)


def _fill(store, arena: ServerArena, target: tuple[int, int] | tuple[int, KVDest], keys, tenant: str,
          deadline: float | None, exact_only: bool = True):
    """Write blocks of ``keys`` (prefix order) into ``target``, a region ``(offset, length)`` with
    :meth:`TieredStore.copy_out` (one copy from memory, cold blocks decoded straight into the arena)
    or a destination ``(offset, KVDest)`` with :meth:`TieredStore.scatter_out`, each checked on the
    arena's bytes, until a miss, a foreign block, with ``exact_only`` a lossy block (none of its bytes
    are written), the deadline or a block that does not fit. Runs on one worker thread.

    :returns: ``([(key, block, tier, place)...], missed, bytes of the block that did not fit or 0)``,
        ``place`` the block's offset in the arena, or with a destination its first token there.
    :raises InvalidBlock: a block of the caller's whose layout is not the destination's geometry.
    :raises DataLoss: a block failed its check on a destination (none of the answer is sent).
    """
    if not arena.alive:
        raise ShmUnavailable("the arena was closed by its owner")
    start, where = target
    dest = where if isinstance(where, KVDest) else None
    owners: dict[bytes, bool] = {}

    def accept(ns_id: bytes) -> bool:
        if ns_id not in owners:
            ns = store.namespace_of(ns_id)
            owners[ns_id] = ns is not None and ns.tenant == tenant
            lay = ns.layout if owners[ns_id] else None
            if dest is not None and lay is not None and (lay.dtype, lay.layers, lay.kv_heads,
                                                         lay.head_dim) != dest.geometry:
                raise InvalidBlock(f"the blocks' layout {lay.describe()} is not the destination's geometry "
                                   f"{dest.geometry}", field="destination")
        return owners[ns_id]

    if dest is None:
        got = store.copy_out(keys, arena.arena.array[start:start + where], align=ALIGNMENT, accept=accept,
                             deadline=deadline, exact_only=exact_only)
        items = [(key, block, tier, start + offset) for key, block, tier, offset in got.items]
    else:
        got = store.scatter_out(keys, dest, accept=accept, deadline=deadline, exact_only=exact_only)
        if got.stop == "damaged":
            raise DataLoss(f"block {len(got.items)} of the chain failed its checksum on its way to the caller; "
                           "no block of this answer is to be used")
        items = got.items
    return items, got.stop == "miss", got.next_bytes
