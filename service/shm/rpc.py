"""The shared-memory RPCs (``OpenArena``, ``PutShm``, ``GetShm``) as the servicer runs them.

:class:`service.servicer.KVCacheServicer` delegates to these functions; they use its caller check,
limits and store exactly as ``Put`` and ``Get`` do, so tenants, quotas and "a miss stops the chain"
are the same on both data paths. Only the bytes move differently:

* **PutShm**: the server leases slots for as many of the next blocks as fit in half the arena and
  answers a ``ShmGrant``; the caller writes the blocks there and answers ``ShmFilled`` with their
  checksums; the server verifies each against the arena bytes. When the whole Put fits one grant,
  the arena views go straight to ``TieredStore.put``, whose own copy into the warm tier is the one
  copy; otherwise each piece is copied out (slots released) and stored with the rest at the end.
  ``TieredStore.put`` runs once, after the last piece: an interrupted call stores nothing.
* **GetShm**: blocks from ``TieredStore.iter_blocks`` are copied into leased slots (one copy from
  the warm or hot tier, a device-to-host copy for a GPU block) and announced in ``ShmBlocks``
  pieces of at most a quarter of the arena, so the caller reads one piece while the next is
  written. A piece's slots are freed when the caller releases it; the call ends after ``GetEnd``
  once every piece was released.

Every wait on the caller is bounded by the registry's ``lease_s`` (then ``DEADLINE_EXCEEDED``), and
every slot is freed in a ``finally``: when the call ends, fails or is cancelled.
"""

from __future__ import annotations

import asyncio
import logging

import numpy as np

from service import convert
from service._gen.kvtier.v1 import kvtier_pb2 as pb
from service.put_stream import plan_from_header
from service.thread_iter import ThreadedIterator
from tiering.codec import checksum
from tiering.errors import InvalidBlock

from .arena import LeaseExpired, ShmUnavailable, Slot
from .broker import ArenaRegistry, ServerArena

log = logging.getLogger(__name__)

#: Blocks a GetShm loads ahead of the one being copied.
GET_WINDOW = 4


def _registry(servicer) -> ArenaRegistry:
    if servicer.shm is None:
        raise ShmUnavailable("shared memory is off on this server (server.shm_enabled = false)")
    return servicer.shm


async def _alloc(arena: ServerArena, length: int, lease_s: float) -> Slot:
    """A slot of ``length`` bytes, waiting up to ``lease_s`` for other calls to free space."""
    if not arena.slots.fits_ever(length):
        raise InvalidBlock(f"a block of {length} bytes does not fit the {arena.slots.size}-byte arena",
                           field="arena_id")
    try:
        async with asyncio.timeout(lease_s):
            while True:
                if not arena.alive:
                    raise ShmUnavailable("the arena was closed by its owner")
                arena.freed.clear()
                slot = arena.slots.alloc(length)
                if slot is not None:
                    return slot
                await arena.freed.wait()
    except TimeoutError:
        raise LeaseExpired(f"no {length}-byte slot freed up within {lease_s:.0f} s") from None


def _free(arena: ServerArena, slots: list[Slot]) -> None:
    for slot in slots:
        arena.slots.free(slot)
    slots.clear()
    arena.notify_freed()


async def open_arena(servicer, request: pb.OpenArenaRequest, context) -> pb.OpenArenaResponse:
    registry = _registry(servicer)
    principal, _ = servicer._caller(context)
    arena_id, ticket, path, size = await registry.issue(principal, request.size_bytes)
    return pb.OpenArenaResponse(arena_id=arena_id, ticket=ticket, socket_path=path, size_bytes=size,
                                alignment=4096)


async def _next(stream, lease_s: float, want: str):
    try:
        async with asyncio.timeout(lease_s):
            msg = await anext(stream, None)
    except TimeoutError:
        raise LeaseExpired(f"the caller sent no {want} within {lease_s:.0f} s; its slots were released") from None
    if msg is None or msg.WhichOneof("msg") != want:
        raise InvalidBlock(f"expected a {want} message", field=want)
    return getattr(msg, want)


async def put_shm(servicer, request_iterator, context):
    """``PutShm`` (module docstring). An async generator of ``PutShmResponse``."""
    registry = _registry(servicer)
    stream = aiter(request_iterator)
    start = await _next(stream, registry.lease_s, "start")
    principal, bound = servicer._caller(context)
    plan = plan_from_header(start.header, convert.tenant_of(start.header.namespace.tenant, bound),
                            max_bytes=servicer.max_put_bytes)
    layout = plan.namespace.layout
    servicer.limits.check_blocks(-(-len(plan.token_ids) // layout.block_tokens), "Put")
    sizes = [layout.block_bytes(plan.block_tokens(plan.first_block + i)) for i in range(plan.block_count)]
    held: list[Slot] = []
    with registry.use(start.arena_id, principal) as arena:
        try:
            blocks: list = []
            done = 0
            while done < len(sizes):
                budget = arena.slots.size // 2  # leave room for the caller's other calls
                held.append(await _alloc(arena, sizes[done], registry.lease_s))
                taken = held[0].capacity
                while done + len(held) < len(sizes) and taken + sizes[done + len(held)] <= budget:
                    slot = arena.slots.alloc(sizes[done + len(held)])
                    if slot is None:
                        break
                    held.append(slot)
                    taken += slot.capacity
                yield pb.PutShmResponse(grant=pb.ShmGrant(first_index=plan.first_block + done, slots=[
                    pb.ShmSlot(offset=s.offset, length=s.length) for s in held]))
                filled = await _next(stream, registry.lease_s, "filled")
                if len(filled.checksums) != len(held):
                    raise InvalidBlock(f"{len(filled.checksums)} checksums for {len(held)} granted slots",
                                       field="filled.checksums")
                whole = done == 0 and len(held) == len(sizes)
                views = [arena.arena.view(s.offset, s.length) for s in held]
                pieces = await asyncio.to_thread(_verify, views, list(filled.checksums), plan.first_block + done,
                                                 copy=not whole)
                blocks += pieces
                done += len(held)
                if not whole:
                    _free(arena, held)
            result = await asyncio.to_thread(_commit, servicer, plan, blocks)
            registry.counters["puts"] += 1
        finally:
            _free(arena, held)
    yield pb.PutShmResponse(done=convert.put_result_to_proto(result))


def _verify(views, sums: list[int], first: int, *, copy: bool) -> list:
    """Check every view against its checksum; copies of them when ``copy`` (the slots get reused)."""
    out = []
    for i, (view, want) in enumerate(zip(views, sums)):
        got = checksum(view)
        if got != want:
            raise InvalidBlock(f"block {first + i}: checksum {got:#018x} of the arena bytes differs from "
                               f"{want:#018x} sent", field="filled.checksums")
        out.append(bytearray(view) if copy else view)
    return out


def _commit(servicer, plan, blocks):
    # As Put's commit: quotas against the real byte count, then one store.put for the whole call.
    servicer.limits.check_put(servicer.store, plan.namespace.tenant, sum(len(b) for b in blocks),
                              plan.session_id is not None and servicer._is_new_session(plan.namespace.tenant,
                                                                                       plan.session_id))
    return servicer.store.put(plan.namespace, plan.token_ids, blocks, first_block=plan.first_block,
                              session_id=plan.session_id, durable=plan.durable, priority=plan.priority,
                              ttl_s=plan.ttl_s)


async def get_shm(servicer, request_iterator, context, deadline: float | None):
    """``GetShm`` (module docstring). An async generator of ``GetShmResponse``."""
    registry = _registry(servicer)
    stream = aiter(request_iterator)
    start = await _next(stream, registry.lease_s, "start")
    principal, bound = servicer._caller(context)
    request = start.request
    tenant = convert.tenant_of(request.tenant, bound)
    with registry.use(start.arena_id, principal) as arena:
        chain, mine = await servicer._target_keys(request, tenant, "Get")
        first = request.start_block
        if first > len(chain):
            raise InvalidBlock(f"start_block {first} is past the {len(chain)} blocks of the chain",
                               field="start_block")
        end = min(len(chain), first + request.max_blocks) if request.max_blocks else len(chain)
        readable = max(first, min(end, len(mine)))
        store = servicer.store
        outstanding: dict[int, list[Slot]] = {}
        all_released = asyncio.Event()
        all_released.set()

        async def releases():
            async for msg in stream:
                if msg.WhichOneof("msg") == "release":
                    _free(arena, outstanding.pop(msg.release.piece, []))
                    if not outstanding:
                        all_released.set()

        def owned(item):
            key, block, tier = item
            if block is not None:
                ns = store.namespace_of(block.ns_id)
                if ns is None or ns.tenant != tenant:
                    return key, None, ""
            return item

        reader = asyncio.get_running_loop().create_task(releases())
        pending: list[tuple] = []
        sent = tokens = piece = 0
        reason = ""
        piece_bytes = max(arena.slots.size // 4, 1)
        try:
            async def flush():
                nonlocal piece, sent, tokens
                slots = [p[4] for p in pending]
                await asyncio.to_thread(_fill, arena, pending)
                msg = pb.GetShmResponse(blocks=pb.ShmBlocks(piece=piece, blocks=[
                    pb.ShmBlock(header=convert.block_header_to_proto(idx, key, block, tier),
                                slot=pb.ShmSlot(offset=s.offset, length=s.length))
                    for idx, key, block, tier, s in pending]))
                outstanding[piece] = slots
                all_released.clear()
                sent += len(pending)
                tokens += sum(p[2].tokens for p in pending)
                pending.clear()
                piece += 1
                return msg

            gen = store.iter_blocks(chain[first:readable], window=GET_WINDOW, deadline=deadline)
            async with ThreadedIterator(gen, owned) as blocks:
                context.add_done_callback(blocks.close_soon)
                async for key, block, tier in blocks:
                    if block is None:
                        reason = "miss"
                        break
                    arena.freed.clear()
                    slot = arena.slots.alloc(block.nbytes)
                    if slot is None:
                        if pending:
                            yield await flush()
                        slot = await _alloc(arena, block.nbytes, registry.lease_s)
                    pending.append((first + sent + len(pending), key, block, tier, slot))
                    if sum(p[4].capacity for p in pending) >= piece_bytes:
                        yield await flush()
                if pending:
                    yield await flush()
            stopped = first + sent
            if not reason and stopped < end:
                reason = "miss" if stopped >= readable else "deadline"
            elif not reason and end < len(chain):
                reason = "max_blocks"
            yield pb.GetShmResponse(end=pb.GetEnd(blocks_sent=sent, complete=stopped == len(chain),
                                                  stopped_at=stopped, reason=reason, tokens=tokens))
            try:
                async with asyncio.timeout(registry.lease_s):
                    await all_released.wait()
            except TimeoutError:
                registry.counters["leases_expired"] += 1
                log.debug("GetShm: caller kept %d pieces past the lease; slots reclaimed", len(outstanding))
            registry.counters["gets"] += 1
        finally:
            reader.cancel()
            for slots in outstanding.values():
                _free(arena, slots)
            _free(arena, [p[4] for p in pending])


def _fill(arena: ServerArena, pending: list[tuple]) -> None:
    """Copy each pending block into its slot (device-to-host for a GPU block: still one copy)."""
    if not arena.alive:
        raise ShmUnavailable("the arena was closed by its owner")
    for _idx, _key, block, _tier, slot in pending:
        if block.data.device.type == "cpu":
            # numpy: one plain memcpy on this thread (torch's copy may wake its OpenMP pool, which
            # contends with the event loop and the gRPC threads on a small host)
            np.copyto(arena.arena.view(slot.offset, slot.length), block.data.numpy().reshape(-1))
        else:
            arena.arena.tensor[slot.offset:slot.offset + slot.length].copy_(block.data.reshape(-1))

