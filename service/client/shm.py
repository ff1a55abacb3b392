"""The client's end of the shared-memory data path: :class:`ShmLink` and :func:`is_local_target`.

A link is opened once per client (lazily, on its first put or get): ``OpenArena`` over the client's
gRPC channel, then the ticket over the server's Unix socket, which answers with the arena's fd. The
client maps it, closes the fd at once (the mapping is all it needs; an fd would only be one more way
in for a child process) and keeps the socket open: closing it, or the process dying, is what tells
the server to drop the arena.

The client owns the arena's space: :class:`ShmLink` leases a range per call from its allocator,
names it in the call and frees it when the call returns (or fails), so the server holds no range
between calls and a dead client leaves nothing but its arena (reclaimed with the socket).

``put`` writes the blocks into a range and runs one ``PutShm`` (one per piece when they
exceed half the arena). A block already in the arena, in a buffer :meth:`ShmLink.buffers` leased (the
caller produced it there), is named where it is: no copy and no checksum on this side; the server
copies it into its tier and checksums that copy, the one the store keeps.
``get`` runs one ``GetShm`` into a range (more when it fills up);
each block (verified by the server on the arena's bytes) is handed out as a view of the arena whose range stays
leased until the tensor is garbage (no copy, and the arena's pages are already mapped, whereas fresh
memory costs a page fault per 4 KiB), up to an alias budget past which blocks are copied out.
Thread-safe: concurrent calls lease disjoint ranges, and wait for one when the arena is full.
``get_kv`` leases one range for a layer-major KV destination (an attention cache's K/V tensors) and
runs one ``GetShm`` naming it: the server scatters the blocks there, and the tensor over that range
stays leased as long as it (or any view of it: a cache's layers) lives, counted in the alias budget.

Opening, each put and each get are *steps* (``service/client/steps.py``: the unary calls to make, the
socket exchange, the waits for a free range), run by the blocking or the asyncio driver of the client
(``service/client/core.py``); the asyncio one never blocks the event loop while waiting for a range.
``PutShm``/``GetShm`` travel over the arena's socket when the server serves them there (one frame each
way, ``shm_control.py``), else as unary gRPC calls.
Imports wire/, the client's steps, blockwire, shm_control and types, and tiering's byte copy and checksum.
"""

from __future__ import annotations

import collections
import logging
import os
import socket
import threading
import time
import weakref
from collections.abc import Sequence

import grpc
import numpy as np
import torch

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.blockwire import decode_block
from kvtier.service.client import shm_control
from kvtier.service.client.kvget import as_dest, kv_shape
from kvtier.service.client.requests import rest_request
from kvtier.service.client.steps import Blocking, Steps, Unary, Wait
from kvtier.service.client.types import TORCH_DTYPES, GetResult, KVResult, KVTierClientError
from kvtier.service.wire.convert import TIER_FROM_PROTO
from kvtier.tiering.bytecopy import copy_many
from kvtier.tiering.codec import checksum
from kvtier.tiering.keys import BlockKey
from kvtier.tiering.layout import BlockLayout

from kvtier.service.wire.arena import ALIGNMENT, Arena, Slot, SlotAllocator, align_up

log = logging.getLogger(__name__)

#: Seconds between looks for block tensors that died while a call waits for arena space.
RECLAIM_POLL_S = 0.02
#: Hosts whose servers share this machine (a ``unix:`` target always does).
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})


def is_local_target(target: str) -> bool:
    """Whether a gRPC ``target`` names a server on this host (loopback address or ``unix:`` socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix):]
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    return host.strip("[]") in {h.strip("[]") for h in LOCAL_HOSTS}


class ShmLink:
    """A mapped arena and the socket that keeps it alive. Create with :meth:`open`; :meth:`close` it.

    :ivar arena_id: the server's handle of the arena (a secret: only this client knows it).
    """

    def __init__(self, arena_id: str, arena: Arena, sock: socket.socket, *, control: bool = False) -> None:
        self.arena_id = arena_id
        self.arena = arena
        self._sock = sock
        #: set by :meth:`close` (stops the arena's prefault thread, if any)
        self.closed = threading.Event()
        #: The calls' way over the arena's socket (``None``: they go over gRPC; see :meth:`open`).
        self.control = shm_control.ControlChannel(sock) if control else None
        self.slots = SlotAllocator(arena.size)
        self._freed = threading.Condition()
        #: Most bytes of the arena that tensors handed out (Get's blocks, leased buffers) may view at once:
        #: past it blocks are copied out and buffers are ordinary memory, so calls always find room.
        self.alias_budget = arena.size // 2
        self._aliased = 0
        self._finalizers: dict[int, weakref.finalize] = {}
        self._dead: collections.deque[Slot] = collections.deque()
        #: Ranges of the buffers :meth:`buffers` leased that are still alive, by offset.
        self._buffers: dict[int, Slot] = {}
        self._base = self.arena.array.ctypes.data
        #: Check every block's checksum here too. The server already checked it on the arena's bytes
        #: after writing them (the range is this call's alone from then on), so this only catches the
        #: caller's own stray writes into its arena, at ~0.1 ms per 2 MiB.
        self.verify = False

    @classmethod
    def open(cls, timeout: float | None, size: int = 0) -> Steps:
        """Steps leasing an arena from the server (``OpenArena``, then the ticket over its socket).

        When the server offers it (``OpenArenaResponse.control``) and ``KVTIER_SHM_CONTROL`` is not
        ``grpc``, the link's ``PutShm``/``GetShm`` calls then go over that socket
        (``service/client/shm_control.py``), else over gRPC.

        :raises KVTierClientError: the code the server answered (``FAILED_PRECONDITION``: shared
            memory is off; ``UNIMPLEMENTED``: an older server).
        :raises OSError: if the socket cannot be reached or hands no fd (another host, another uid).
        """
        resp = yield Unary("OpenArena", pb.OpenArenaRequest(size_bytes=size), timeout)
        return (yield Blocking(cls._connect, (resp, timeout)))

    @classmethod
    def _connect(cls, resp: pb.OpenArenaResponse, timeout: float | None) -> "ShmLink":
        """Hand the ticket over the arena socket and map the fd it answers with."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # close-on-exec, as every Python fd
        try:
            sock.settimeout(timeout if timeout is not None else 10.0)
            sock.connect(resp.socket_path)
            sock.sendall(resp.ticket)
            _msg, fds, _flags, _addr = socket.recv_fds(sock, 1, 1)
            if not fds:
                raise OSError("the arena socket closed without handing an fd (ticket refused)")
            try:
                os.set_inheritable(fds[0], False)
                arena = Arena(fds[0], resp.size_bytes)
                closed = threading.Event()
                if resp.prefault:  # the server allocates the pages; this fills our page tables, reads only
                    arena.prefault_in_background(closed)
            finally:
                for fd in fds:
                    os.close(fd)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        log.debug("shared-memory arena of %d MiB mapped from %s", resp.size_bytes >> 20, resp.socket_path)
        link = cls(resp.arena_id, arena, sock, control=resp.control and shm_control.wanted())
        link.closed = closed
        return link

    def _lease(self, need: int, want: int, deadline: float | None) -> Steps:
        """Steps giving a range of ``need`` to ``want`` bytes, waiting (until ``deadline``) for other
        calls to free one.

        :raises KVTierClientError: ``INVALID_ARGUMENT`` if ``need`` exceeds the arena;
            ``DEADLINE_EXCEEDED`` if none frees up in time.
        """
        if not self.slots.fits_ever(need):
            raise KVTierClientError(grpc.StatusCode.INVALID_ARGUMENT, f"a block of {need} bytes does not fit the "
                                    f"{self.arena.size}-byte shared-memory arena; use data_path='grpc'")
        while True:
            self._reclaim()
            with self._freed:
                if (slot := self.slots.alloc_upto(need, want)) is not None:
                    return slot
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise KVTierClientError(grpc.StatusCode.DEADLINE_EXCEEDED,
                                            f"no {need}-byte range of the shared-memory arena freed up in time")
            # woken by a call freeing its range; ranges of dead tensors are polled for
            yield Wait(RECLAIM_POLL_S if left is None else min(left, RECLAIM_POLL_S), self._freed)

    def _free(self, slot: Slot) -> None:
        self.slots.free(slot)
        with self._freed:
            self._freed.notify_all()

    @staticmethod
    def _left(deadline: float | None) -> float | None:
        return None if deadline is None else max(deadline - time.monotonic(), 0.001)

    def buffers(self, shapes: Sequence[tuple[int, ...]], dtype: torch.dtype) -> list[torch.Tensor]:
        """Tensors of ``shapes`` that view leased ranges of the arena, for the caller to produce blocks into
        and :meth:`put` to name in place (no copy, no checksum on this side). Never waits.

        A range stays leased until its tensor (and every view of it) is garbage, as for Get's blocks, and
        counts against :attr:`alias_budget` with them; a shape past that budget, or finding no free range,
        gets an ordinary tensor instead (which ``put`` copies as any other payload).
        """
        self._reclaim()
        out = []
        for shape in shapes:
            n = int(np.prod(shape)) * dtype.itemsize
            cap = align_up(n)
            with self._freed:
                lease = n > 0 and self._aliased + cap <= self.alias_budget
                if lease:
                    self._aliased += cap
            slot = self.slots.alloc(n) if lease else None
            if slot is None:
                if lease:
                    with self._freed:
                        self._aliased -= cap
                out.append(torch.empty(shape, dtype=dtype))
                continue
            view = self.arena.array[slot.offset:slot.offset + n]
            with self._freed:
                self._buffers[slot.offset] = slot
                self._finalizers[slot.offset] = weakref.finalize(view, self._unalias, slot)
            out.append(torch.from_numpy(view).view(dtype).reshape(shape))
        return out

    def _named(self, view: memoryview) -> int | None:
        """The arena offset of ``view`` when it is (the start of) a live buffer of :meth:`buffers`: then its
        bytes stay put until the call returns (the caller's payload holds the buffer alive). ``None``
        for anything else (other memory, a part of the arena that is not a buffer's start), to be copied."""
        if not len(view):
            return None
        offset = np.frombuffer(view, dtype=np.uint8).ctypes.data - self._base
        with self._freed:
            slot = self._buffers.get(offset)
        return offset if slot is not None and len(view) <= slot.length else None

    def put(self, header: pb.PutHeader, views: Sequence[memoryview], timeout: float | None) -> Steps:
        """Steps writing the blocks into a leased range and running ``PutShm`` (one call per piece of at
        most half the arena of copies; the server stores nothing before the last). Return the ``PutResponse``.

        A block in a leased buffer (:meth:`buffers`) is named where it is; the others are copied into a
        range and checksummed in the same pass. A call naming any buffer sends no checksums (the server
        checksums its own copy, the bytes it keeps: what it stores and its checksum always agree).

        :raises KVTierClientError: as a call fails; ``INVALID_ARGUMENT`` for a block larger than the arena.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        named = [self._named(v) for v in views]
        sizes = [0 if at is not None else align_up(len(v)) for v, at in zip(views, named)]
        budget = self.arena.size // 2
        upload_id, i, left = "", 0, sum(sizes)
        while True:
            # a range for as many copies as fit half the arena, or at least the next one (other ranges
            # may be held by the caller's buffers and Get blocks: take what is free rather than wait)
            need = next((size for size in sizes[i:] if size), 0)
            slot = (yield from self._lease(need, min(left, budget), deadline)) if need else None
            j, total = i, 0
            while j < len(views) and total + sizes[j] <= (slot.length if slot is not None else 0):
                total += sizes[j]
                j += 1
            left -= total
            try:
                req = pb.PutShmRequest(arena_id=self.arena_id, upload_id=upload_id, more=j < len(views))
                if not upload_id:
                    req.header.CopyFrom(header)
                pos = slot.offset if slot is not None else 0
                pairs = []
                for k in range(i, j):
                    n = len(views[k])
                    if named[k] is not None:
                        req.slots.add(offset=named[k], length=n)
                        continue
                    pairs.append((self.arena.array[pos:pos + n], views[k]))
                    req.slots.add(offset=pos, length=n)
                    pos += sizes[k]
                # copied and checksummed in one pass, on the copy threads: the checksum is of the arena's bytes
                sums = copy_many(pairs)
                if len(sums) == j - i:  # else named buffers: no checksums at all, the server hashes its copy
                    req.checksums.extend(sums)
                resp = yield Unary("PutShm", req, self._left(deadline), via=self.control)
            finally:
                if slot is not None:
                    self._free(slot)
            if j >= len(views):
                return resp.done
            upload_id, i = resp.upload_id, j

    def get(self, request: pb.GetRequest, timeout: float | None) -> Steps:
        """Steps running ``GetShm`` into a leased range (again for the rest when it fills up; the server
        verified each block on the arena's bytes). Return the :class:`GetResult`.

        A block's tensor is a view of the arena while the blocks handed out that way hold at most
        :attr:`alias_budget` bytes: its range stays leased until the tensor (and every view of it) is
        garbage, so no call ever writes there meanwhile. Past that budget blocks are copied out and
        their range freed at once, so a caller holding many results never starves later calls.

        :raises KVTierClientError: as a call fails; ``DATA_LOSS`` when a block fails its checksum
            (nothing is returned); ``INVALID_ARGUMENT`` for a block larger than the arena.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        blocks, keys, tiers, lossy = [], [], [], []
        base, need, want = 0, ALIGNMENT, self.arena.size // 2
        while True:
            region = yield from self._lease(need, want, deadline)
            kept: list[Slot] = []
            try:
                resp = yield Unary("GetShm", pb.GetShmRequest(
                    arena_id=self.arena_id, request=request,
                    region=pb.ShmSlot(offset=region.offset, length=region.length)), self._left(deadline),
                    via=self.control)
                for item in resp.blocks:
                    blocks.append(self._block(item, region, base, kept))
                    keys.append(BlockKey(bytes(item.header.key)))
                    tiers.append(TIER_FROM_PROTO.get(item.header.tier))
                    lossy.append(item.header.lossy)
            except BaseException:
                with self._freed:  # none of these tensors reaches the caller: the region goes back whole
                    for slot in kept:
                        self._finalizers.pop(slot.offset).detach()
                        self._aliased -= slot.capacity
                self._free(region)
                raise
            self.slots.carve(region, kept)
            with self._freed:
                self._freed.notify_all()
            end = resp.end
            if end.reason != "region":
                break
            # the rest of the same chain, by its keys (a session might change between two calls)
            left = request.max_blocks - (end.stopped_at - request.start_block) if request.max_blocks else 0
            base += end.stopped_at
            request = rest_request(request, resp.rest_keys, left)
            need = max(resp.next_block_bytes, ALIGNMENT)
        stopped = base + end.stopped_at
        return GetResult(blocks, keys, tiers, end.complete, None if end.complete else stopped, end.reason,
                         sum(int(b.shape[3]) for b in blocks), lossy)

    def _block(self, item: pb.ShmBlock, region: Slot, base: int, kept: list[Slot]) -> torch.Tensor:
        """The verified tensor of one ``ShmBlock`` in ``region``: a view of the arena (its range added to
        ``kept``) within the alias budget, else a copy."""
        head = item.header
        if not region.offset <= item.offset <= region.offset + region.length - head.size or item.offset % ALIGNMENT:
            raise KVTierClientError(grpc.StatusCode.INTERNAL, f"block {base + head.index}: [{item.offset}, "
                                    f"+{head.size}) is not an aligned range of the one leased")
        view = self.arena.array[item.offset:item.offset + head.size]
        cap = align_up(head.size)
        with self._freed:
            alias = head.size > 0 and self._aliased + cap <= self.alias_budget
            if alias:
                self._aliased += cap
        if not alias:
            return decode_block(head, bytearray(view))
        slot = Slot(item.offset, head.size, cap)
        kept.append(slot)
        self._finalizers[slot.offset] = weakref.finalize(view, self._unalias, slot)
        # the range is ours alone until `view` dies: verifying it here is verifying what the caller gets
        if self.verify and checksum(view) != head.checksum:
            raise KVTierClientError(grpc.StatusCode.DATA_LOSS, f"block {base + head.index} (key {head.key.hex()}) "
                                    f"failed its checksum; the bytes were not used")
        dtype, shape = TORCH_DTYPES.get(head.dtype), tuple(head.shape)
        if dtype is None or len(shape) != 5 or int(np.prod(shape)) * dtype.itemsize != head.size:
            raise KVTierClientError(grpc.StatusCode.INTERNAL,
                                    f"block {base + head.index}: {head.size} bytes do not hold {head.dtype} {shape}")
        # torch.from_numpy keeps `view` alive for as long as the tensor's storage lives
        return torch.from_numpy(view).view(dtype).reshape(shape)

    def holds_kv(self, nbytes: int) -> bool:
        """Whether a KV destination of ``nbytes`` fits the alias budget now (else: use the Get stream)."""
        self._reclaim()
        with self._freed:
            return self._aliased + align_up(nbytes) <= self.alias_budget

    def get_kv(self, request: pb.GetRequest, layout: BlockLayout, capacity: int, timeout: float | None) -> Steps:
        """Steps leasing a KV destination of ``capacity`` tokens in the arena and running one ``GetShm``
        that scatters the blocks into it (each verified by the server on those bytes). Return the
        :class:`KVResult`; its ``kv`` keeps the range leased while it or a view of it lives.

        :raises KVTierClientError: as the call fails; ``DATA_LOSS`` when a block failed its check (the
            range goes back, nothing is returned); ``INVALID_ARGUMENT`` for a layout other than the blocks'
            or a destination larger than the arena.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        shape = kv_shape(layout, capacity)
        kv_bytes = int(np.prod(shape)) * TORCH_DTYPES[layout.dtype].itemsize
        slot = yield from self._lease(align_up(kv_bytes), align_up(kv_bytes), deadline)
        try:
            resp = yield Unary("GetShm", pb.GetShmRequest(arena_id=self.arena_id, request=request, destination=
                               pb.ShmKVDestination(offset=slot.offset, capacity_tokens=capacity, dtype=layout.dtype,
                                                   layers=layout.layers, kv_heads=layout.kv_heads,
                                                   head_dim=layout.head_dim)), self._left(deadline))
            view = self.arena.array[slot.offset:slot.offset + kv_bytes]
            kv = torch.from_numpy(view).view(TORCH_DTYPES[layout.dtype]).reshape(shape)
            dest, tokens = as_dest(kv, layout.dtype), 0
            for item in resp.blocks:
                head = item.header
                if item.first_token != tokens or not dest.fits(head.dtype, tuple(head.shape)) \
                        or tokens + head.shape[3] > capacity:
                    raise KVTierClientError(grpc.StatusCode.INTERNAL, f"block {head.index} is not the next "
                                            f"{head.dtype} {tuple(head.shape)} block of the destination")
                if self.verify and dest.checksum_at(tokens, head.shape[3]) != head.checksum:
                    raise KVTierClientError(grpc.StatusCode.DATA_LOSS, f"block {head.index} (key {head.key.hex()}) "
                                            "failed its checksum; the bytes were not used")
                tokens += head.shape[3]
        except BaseException:
            self._free(slot)
            raise
        with self._freed:
            self._aliased += slot.capacity
            self._finalizers[slot.offset] = weakref.finalize(view, self._unalias, slot)
        end = resp.end
        return KVResult(kv, [BlockKey(bytes(b.header.key)) for b in resp.blocks],
                        [TIER_FROM_PROTO.get(b.header.tier) for b in resp.blocks], end.complete,
                        None if end.complete else end.stopped_at, end.reason, tokens,
                        [b.header.lossy for b in resp.blocks])

    def _unalias(self, slot: Slot) -> None:
        # A finalizer may run inside any allocation (cyclic GC), even one under the allocator's lock:
        # only queue the range here (deque.append is atomic); _reclaim frees it outside every lock.
        self._dead.append(slot)

    def _reclaim(self) -> None:
        """Free the ranges of block tensors that became garbage."""
        while self._dead:
            slot = self._dead.popleft()
            with self._freed:
                self._finalizers.pop(slot.offset, None)
                self._buffers.pop(slot.offset, None)
                self._aliased -= slot.capacity
            self._free(slot)

    def close(self) -> None:
        """Close the socket (the server drops the arena); the mapping goes with the last reference."""
        self.closed.set()
        if self.control is not None:
            self.control.close()
        else:
            self._sock.close()

