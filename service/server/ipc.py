"""CUDA IPC gets (``GetIpc``/``ReleaseIpc``): hot blocks handed to a same-host CUDA caller on the GPU.

May import torch, ``service.wire`` (convert, stubs, cuda_ipc) and ``service.server`` (core, errors, shm_broker).

Design. One call, on one worker thread: the chain's blocks that are in the hot tier (prefix order, up
to the first that is not) are copied into one fresh buffer on the hot tier's GPU (device to device, at
memory bandwidth), the copies are waited for, and the buffer is shared
(:func:`service.wire.cuda_ipc.share`). The answer carries the buffer's handle and each block's offset;
the server holds the buffer under a lease (:class:`IpcLeases`) until ``ReleaseIpc``, ``store.lease_s``
seconds, or the caller's arena closing, whichever comes first.

Why a buffer per call rather than the tier's own tensors: torch wraps a storage anew at every share
and the wrappers live as long as the storage, so a popular prefix block would gather them for as long
as it stays hot; and a shared block evicted while a reader still maps it keeps GPU memory the tier no
longer counts. A buffer per call bounds both to its lease, needs one handle (one
``cudaIpcOpenMemHandle`` on the caller's side) per call, and leaves the tier's tensors untouched; it
needs no pin either, since nothing reads the tier after the copy. Buffers count against
``max_bytes`` (every lease together): a call that does not fit stops with reason ``"ipc_budget"``.

Nothing moves between tiers: a block in the warm or cold tier stops the answer (``"not_hot"``) and the
answer names the rest of the chain's keys, which the caller fetches through ``GetShm`` or ``Get``.
Tenancy, limits and stopping rules are Get's: keys named explicitly are cut at the first one the
tenant does not hold, a session is the tenant's own, another tenant's block answers like a miss.

Trust model:

* handles are plain fields, never a pickle (:mod:`service.wire.cuda_ipc`);
* a CUDA IPC mapping covers the whole allocation the buffer lies in, a segment of the server's
  caching allocator that may also hold hot blocks of other tenants. So GetIpc serves only a caller
  that holds an arena (it is on this host) whose process runs as the server's user, which could read
  the server's memory anyway (``ptrace``, ``/proc/<pid>/mem``); anyone else gets FAILED_PRECONDITION
  and uses ``GetShm``;
* the reader maps or releases each buffer exactly once (torch's reference count). One that dies while
  holding a mapping leaves that buffer allocated until the server exits (torch's documented limit);
  ``Stats`` counts leases that ended unreleased (``ipc_leases_expired``, ``ipc_leases_orphaned``).

Leases are created, released and expired on the event loop; worker threads only reserve and return
budget, under a lock.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

import torch

from kvtier.service.server.core import ServerCore
from kvtier.service.server.chain import ChainRead
from kvtier.service.server.errors import IpcUnavailable, LeaseNotFound
from kvtier.service.server.shm_broker import ArenaRegistry
from kvtier.service.wire import convert, cuda_ipc
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire.arena import align_up
from kvtier.tiering.errors import InvalidBlock

log = logging.getLogger(__name__)

#: Bytes of CUDA IPC buffers the server holds at most, every lease together (outside the hot tier's
#: capacity: they are short-lived copies).
MAX_STAGED_BYTES = 1 << 30
#: Each block starts on a multiple of this in its buffer (enough for every dtype's alignment).
ALIGN = 512


@dataclass(eq=False)
class Staged:
    """The blocks one call copied into a shared buffer.

    :ivar blocks: ``(key, block, offset in the buffer)`` in prefix order.
    :ivar reason: why the hot prefix ended early (``"miss"``, ``"not_hot"``, ``"deadline"``,
        ``"ipc_budget"``), or ``""``.
    :ivar nbytes: bytes reserved from the budget (the buffer's size).
    """

    blocks: list
    reason: str
    nbytes: int = 0
    buffer: torch.Tensor | None = None
    handle: pb.CudaIpcBuffer | None = None


@dataclass(eq=False)
class _Lease:
    principal: object
    arena: object  # service.server.shm_broker.ServerArena
    staged: Staged
    timer: asyncio.TimerHandle | None = field(default=None, repr=False)


class IpcLeases:
    """The shared buffers on lease, by lease id, and the budget they count against.

    :param lease_s: seconds a lease lasts unless released.
    :param max_bytes: bytes of buffers held at most, all leases together.
    """

    def __init__(self, lease_s: float, max_bytes: int = MAX_STAGED_BYTES) -> None:
        self.lease_s = lease_s
        self.max_bytes = max_bytes
        self.counters: Counter[str] = Counter()
        self._leases: dict[str, _Lease] = {}
        self._lock = threading.Lock()
        self._staged = 0
        self._uuids: dict[torch.device, str] = {}

    def device_uuid(self, device: torch.device) -> str:
        """The UUID of a CUDA device of the server (asked of CUDA once)."""
        if device not in self._uuids:
            self._uuids[device] = cuda_ipc.device_uuid(device)
        return self._uuids[device]

    # -- budget (any thread) ------------------------------------------------------------------------
    def reserve(self, sizes: list[int]) -> int:
        """Reserve the longest prefix of ``sizes`` that fits the budget. Returns its length."""
        with self._lock:
            n, total = 0, 0
            while n < len(sizes) and self._staged + total + sizes[n] <= self.max_bytes:
                total += sizes[n]
                n += 1
            self._staged += total
            return n

    def unreserve(self, nbytes: int) -> None:
        with self._lock:
            self._staged -= nbytes

    def abandon(self, staged: Staged) -> None:
        """Undo a staging whose answer never left: give back the reader's reference (nobody saw the
        handle, so nobody will), then the budget. Any thread."""
        if staged.handle is not None:
            try:
                cuda_ipc.release_unopened(staged.handle, staged.buffer.device)
            except (ValueError, RuntimeError):
                log.warning("could not give back the reference of an unsent CUDA IPC buffer", exc_info=True)
        staged.buffer = staged.handle = None
        self.unreserve(staged.nbytes)

    # -- leases (event loop) ------------------------------------------------------------------------
    def add(self, principal, arena, staged: Staged) -> str:
        """Hold ``staged`` for ``principal`` until released, ``lease_s`` seconds, or ``arena`` closing.

        :returns: the lease id (a secret: only the caller learns it).
        """
        lease_id = secrets.token_hex(16)
        lease = _Lease(principal, arena, staged)
        lease.timer = asyncio.get_running_loop().call_later(self.lease_s, self._expire, lease_id)
        self._leases[lease_id] = lease
        return lease_id

    def release(self, lease_id: str, principal) -> None:
        """End the caller's lease ``lease_id``.

        :raises LeaseNotFound: if it holds no such lease (another principal's answers the same way).
        """
        self.sweep()
        lease = self._leases.get(lease_id)
        if lease is None or lease.principal != principal:
            raise LeaseNotFound("no CUDA IPC lease with this id for this caller (released, expired after "
                                f"{self.lease_s:.0f} s, or never granted)")
        self._drop(lease_id, "released")

    def sweep(self) -> None:
        """End the leases whose arena closed (the caller exited or closed its link)."""
        for lease_id in [i for i, lease in self._leases.items() if not lease.arena.alive]:
            self._drop(lease_id, "orphaned")

    def _expire(self, lease_id: str) -> None:
        if lease_id in self._leases:
            log.debug("CUDA IPC lease %s… expired after %.0f s unreleased", lease_id[:8], self.lease_s)
            self._drop(lease_id, "expired")

    def _drop(self, lease_id: str, outcome: str) -> None:
        lease = self._leases.pop(lease_id)
        if lease.timer is not None:
            lease.timer.cancel()
        # torch frees the buffer now if its reader gave its reference back, else once it does
        lease.staged.buffer = lease.staged.handle = None
        self.unreserve(lease.staged.nbytes)
        self.counters[f"leases_{outcome}"] += 1

    def stats(self) -> dict[str, int]:
        """Counters for ``Stats``: leases open and bytes held now, totals since start (``ipc_`` names)."""
        out = {f"ipc_{k}": v for k, v in self.counters.items()}
        out["ipc_leases_open"] = len(self._leases)
        with self._lock:
            out["ipc_staged_bytes"] = self._staged
        return out


def _hot_cuda_tier(store):
    """The store's hot tier. :raises IpcUnavailable: unless it is on a CUDA device."""
    hot = next((t for t in store.memory if t.name == "hot"), None)
    if hot is None or hot.device.type != "cuda":
        where = "off" if hot is None else f"on {hot.device}"
        raise IpcUnavailable(f"this server's hot tier is {where}, not on a CUDA device, so it offers no CUDA IPC; "
                             "fetch the blocks with GetShm or Get (KVTierClient.get(device=...) does so by itself)")
    return hot


def _same_user(pid: int) -> bool:
    """Whether process ``pid`` runs as this process's effective user."""
    try:
        return os.stat(f"/proc/{pid}").st_uid == os.geteuid()
    except OSError:
        return False


def _hot_prefix(store, keys, tenant: str, deadline: float | None, exact_only: bool = True) -> tuple[list, str]:
    """``[(key, block)...]`` of the leading ``keys`` whose blocks are in the hot tier (with ``exact_only``,
    up to a lossy one: a miss), and why it ended early (``""``: none left). Reads no lower tier and
    promotes nothing."""
    out = []
    for key in keys:
        if deadline is not None and time.monotonic() > deadline:
            return out, "deadline"
        where = store.where(key)
        if where is None:
            return out, "miss"
        if where != "hot":
            return out, "not_hot"
        got = store.get(key, promote=False)
        if got is None:
            return out, "miss"
        block, tier = got
        if tier != "hot":
            return out, "not_hot"  # evicted since `where` looked
        ns = store.namespace_of(block.ns_id)
        if ns is None or ns.tenant != tenant or (exact_only and block.lossy):
            return out, "miss"
        out.append((key, block))
    return out, ""


def stage(store, leases: IpcLeases, device: torch.device, keys, tenant: str, deadline: float | None,
          exact_only: bool = True) -> Staged:
    """Copy the hot prefix of ``keys`` into one fresh buffer on ``device`` and share it. Runs on one
    worker thread; the caller owns the result (register it with :meth:`IpcLeases.add`, or
    :meth:`IpcLeases.abandon` it).

    Out of budget or of GPU memory, fewer blocks (maybe none) are staged, with reason ``"ipc_budget"``.
    """
    found, reason = _hot_prefix(store, keys, tenant, deadline, exact_only)
    sizes = [align_up(block.nbytes, ALIGN) for _, block in found]
    n = leases.reserve(sizes)
    if n < len(found):
        found, sizes, reason = found[:n], sizes[:n], "ipc_budget"
    total = sum(sizes)
    if not found:
        return Staged([], reason)
    try:
        buffer = torch.empty(total, dtype=torch.uint8, device=device)
        blocks, pos = [], 0
        for (key, block), size in zip(found, sizes):
            buffer[pos:pos + block.nbytes].copy_(block.data)
            blocks.append((key, block, pos))
            pos += size
        # the copies are done before anyone may read (torch also hands the reader an event to wait on)
        torch.cuda.current_stream(device).synchronize()
        handle = cuda_ipc.share(buffer)
    except torch.OutOfMemoryError:
        leases.unreserve(total)
        log.debug("no GPU memory for a %d-byte CUDA IPC buffer; the caller takes the host path", total)
        return Staged([], "ipc_budget")
    except BaseException:
        leases.unreserve(total)
        raise
    return Staged(blocks, reason, total, buffer, handle)


async def get_ipc(core: ServerCore, shm: ArenaRegistry | None, leases: IpcLeases, request: pb.GetIpcRequest,
                  context, deadline: float | None) -> pb.GetIpcResponse:
    """``GetIpc`` (module docstring)."""
    caller = core.caller(context)
    req = request.request
    tenant = caller.tenant(req.tenant)
    if not request.arena_id:
        raise InvalidBlock("arena_id is required (CUDA IPC is for callers with an arena: OpenArena)",
                           field="arena_id")
    try:
        wanted = cuda_ipc.normalize_uuid(request.device_uuid)
    except ValueError as exc:
        raise InvalidBlock(f"device_uuid: {exc}", field="device_uuid") from None
    read = await core.read_chain(req, tenant)
    if shm is None:
        raise IpcUnavailable("shared memory is off on this server (server.shm_enabled = false), and CUDA IPC with "
                             "it; fetch the blocks with Get")
    leases.sweep()
    with shm.use(request.arena_id, caller.principal) as arena:
        hot = _hot_cuda_tier(core.store)
        if not _same_user(arena.peer_pid):
            raise IpcUnavailable("CUDA IPC is offered to processes running as the server's user only (a mapping "
                                 "shows the server's GPU memory around the blocks); fetch the blocks with GetShm")
        if wanted != leases.device_uuid(hot.device):
            raise IpcUnavailable(f"device {wanted} is not this server's hot-tier GPU, so CUDA IPC cannot reach it; "
                                 "fetch the blocks with GetShm (or ask with the hot tier's device)")
        work = asyncio.ensure_future(asyncio.to_thread(stage, core.store, leases, hot.device, read.wanted, tenant,
                                                       deadline, not req.accept_lossy))
        try:
            staged = await asyncio.shield(work)
        except asyncio.CancelledError:
            # the staging runs on regardless: undo it when it ends (nobody will see its handle)
            work.add_done_callback(lambda w: w.cancelled() or w.exception() is not None or leases.abandon(w.result()))
            raise
        try:
            resp = _response(staged, read, leases.lease_s)
        except BaseException:
            leases.abandon(staged)
            raise
        if staged.blocks:
            resp.lease_id = leases.add(caller.principal, arena, staged)
            leases.counters["gets"] += 1
            leases.counters["blocks"] += len(staged.blocks)
            leases.counters["bytes"] += sum(block.nbytes for _, block, _ in staged.blocks)
    return resp


def _response(staged: Staged, read: ChainRead, lease_s: float) -> pb.GetIpcResponse:
    resp = pb.GetIpcResponse(lease_seconds=lease_s, blocks=[
        pb.IpcBlock(header=convert.block_header_to_proto(read.start + i, key, block, "hot"), offset=offset)
        for i, (key, block, offset) in enumerate(staged.blocks)])
    if staged.handle is not None:
        resp.buffer.CopyFrom(staged.handle)
    sent = len(staged.blocks)
    if staged.reason in ("not_hot", "ipc_budget"):
        resp.rest_keys.extend(read.rest(sent))
    resp.end.CopyFrom(read.end_message(sent, sum(block.tokens for _, block, _ in staged.blocks), staged.reason))
    return resp


async def release_ipc(core: ServerCore, leases: IpcLeases, request: pb.ReleaseIpcRequest,
                      context) -> pb.ReleaseIpcResponse:
    """``ReleaseIpc``: end the caller's lease (:meth:`IpcLeases.release`)."""
    principal = core.caller(context).principal
    if not request.lease_id:
        raise InvalidBlock("lease_id is required", field="lease_id")
    leases.release(request.lease_id, principal)
    return pb.ReleaseIpcResponse()
