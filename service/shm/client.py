"""The client's end of the shared-memory data path: :class:`ShmLink` and :func:`is_local_target`.

A link is opened once per client (lazily, on its first put or get): ``OpenArena`` over the client's
gRPC channel, then the ticket over the server's Unix socket, which answers with the arena's fd. The
client maps it, closes the fd at once (the mapping is all it needs; an fd would only be one more way
in for a child process) and keeps the socket open: closing it, or the process dying, is what tells
the server to drop the arena.

``put`` and ``get`` run one ``PutShm``/``GetShm`` call each over the blocking stub. Blocks that
come back are copied once out of the arena (into a ``bytearray`` the tensor then shares), verified
against their checksum and returned; the piece is then released, so no tensor handed to the caller
ever aliases the arena. Thread-safe: concurrent calls get disjoint slots from the server.
"""

from __future__ import annotations

import logging
import os
import queue
import socket
from collections.abc import Sequence

import grpc
import numpy as np

from service._gen.kvtier.v1 import kvtier_pb2 as pb
from service.blockwire import decode_block
from service.client_types import GetResult, KVTierClientError
from service.convert import TIER_FROM_PROTO
from tiering.codec import checksum
from tiering.keys import BlockKey

from .arena import Arena

log = logging.getLogger(__name__)

#: Hosts whose servers share this machine (a ``unix:`` target always does).
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "[::1]"})
_END = object()


def is_local_target(target: str) -> bool:
    """Whether a gRPC ``target`` names a server on this host (loopback address or ``unix:`` socket)."""
    if target.startswith(("unix:", "unix-abstract:")):
        return True
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix):]
    host = target.rsplit(":", 1)[0] if target.count(":") == 1 or target.startswith("[") else target
    return host.strip("[]") in {h.strip("[]") for h in LOCAL_HOSTS}


def _requests(first, pending: queue.SimpleQueue):
    yield first
    while (item := pending.get()) is not _END:
        yield item


class ShmLink:
    """A mapped arena and the socket that keeps it alive. Create with :meth:`open`; :meth:`close` it.

    :ivar arena_id: the server's handle of the arena (a secret: only this client knows it).
    """

    def __init__(self, arena_id: str, arena: Arena, sock: socket.socket) -> None:
        self.arena_id = arena_id
        self.arena = arena
        self._sock = sock

    @classmethod
    def open(cls, stub, metadata, timeout: float | None, size: int = 0) -> "ShmLink":
        """Lease an arena from the server behind ``stub``.

        :raises KVTierClientError: the code the server answered (``FAILED_PRECONDITION``: shared
            memory is off; ``UNIMPLEMENTED``: an older server).
        :raises OSError: if the socket cannot be reached or hands no fd (another host, another uid).
        """
        try:
            resp = stub.OpenArena(pb.OpenArenaRequest(size_bytes=size), timeout=timeout, metadata=metadata)
        except grpc.RpcError as exc:
            from service.client_proto import client_error
            raise client_error(exc) from None
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
            finally:
                for fd in fds:
                    os.close(fd)
            sock.settimeout(None)
        except BaseException:
            sock.close()
            raise
        log.debug("shared-memory arena of %d MiB mapped from %s", resp.size_bytes >> 20, resp.socket_path)
        return cls(resp.arena_id, arena, sock)

    def put(self, stub, metadata, timeout: float | None, header: pb.PutHeader,
            views: Sequence[memoryview]) -> pb.PutResponse:
        """Run one ``PutShm``: write each granted block into its slot, answer with checksums.

        :raises grpc.RpcError: as the call fails (the caller maps it).
        :raises KVTierClientError: ``INTERNAL`` if the server grants slots that do not fit the blocks.
        """
        pending: queue.SimpleQueue = queue.SimpleQueue()
        start = pb.PutShmRequest(start=pb.PutShmStart(arena_id=self.arena_id, header=header))
        call = stub.PutShm(_requests(start, pending), timeout=timeout, metadata=metadata)
        try:
            for msg in call:
                if msg.WhichOneof("msg") == "done":
                    return msg.done
                grant = msg.grant
                sums = []
                for i, slot in enumerate(grant.slots):
                    pos = grant.first_index - header.first_block + i
                    if not 0 <= pos < len(views) or len(views[pos]) != slot.length:
                        raise KVTierClientError(grpc.StatusCode.INTERNAL, f"server granted a slot of {slot.length} "
                                                f"bytes for block {grant.first_index + i}")
                    src = np.frombuffer(views[pos], dtype=np.uint8)
                    np.copyto(self.arena.view(slot.offset, slot.length), src)
                    sums.append(checksum(src))
                pending.put(pb.PutShmRequest(filled=pb.ShmFilled(checksums=sums)))
            raise KVTierClientError(grpc.StatusCode.INTERNAL, "PutShm ended without an answer")
        finally:
            pending.put(_END)
            call.cancel()  # no-op once it finished

    def get(self, stub, metadata, timeout: float | None, request: pb.GetRequest) -> GetResult:
        """Run one ``GetShm``: copy each piece's blocks out, verify them, release the piece.

        :raises grpc.RpcError: as the call fails. :raises KVTierClientError: ``DATA_LOSS`` when a
            block fails its checksum (the call is cancelled, nothing is returned).
        """
        pending: queue.SimpleQueue = queue.SimpleQueue()
        start = pb.GetShmRequest(start=pb.GetShmStart(arena_id=self.arena_id, request=request))
        call = stub.GetShm(_requests(start, pending), timeout=timeout, metadata=metadata)
        blocks, keys, tiers = [], [], []
        end = None
        try:
            for msg in call:
                if msg.WhichOneof("msg") == "end":
                    end = msg.end
                    pending.put(_END)
                    continue
                for item in msg.blocks.blocks:
                    head, slot = item.header, item.slot
                    if slot.length != head.size:
                        raise KVTierClientError(grpc.StatusCode.INTERNAL, f"block {head.index}: slot of "
                                                f"{slot.length} bytes for {head.size} announced")
                    blocks.append(decode_block(head, bytearray(self.arena.view(slot.offset, slot.length))))
                    keys.append(BlockKey(bytes(head.key)))
                    tiers.append(TIER_FROM_PROTO.get(head.tier))
                pending.put(pb.GetShmRequest(release=pb.ShmRelease(piece=msg.blocks.piece)))
        finally:
            pending.put(_END)
            if end is None:
                call.cancel()
        if end is None:
            raise KVTierClientError(grpc.StatusCode.INTERNAL, "the GetShm call ended without its GetEnd")
        return GetResult(blocks, keys, tiers, end.complete, None if end.complete else end.stopped_at, end.reason,
                         sum(int(b.shape[3]) for b in blocks))

    def close(self) -> None:
        """Close the socket (the server drops the arena); the mapping goes with the last reference."""
        self._sock.close()

