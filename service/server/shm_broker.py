"""ArenaRegistry: the server's arenas, the Unix socket that hands their fds out, and their reclaiming.

May import ``service.server`` (auth, errors) and ``service.wire.arena``.

Life of an arena:

1. ``OpenArena`` (an authenticated RPC) calls :meth:`ArenaRegistry.issue`: a 128-bit secret arena id
   and a single-use 256-bit ticket, valid :data:`TICKET_S` seconds, both bound to the caller's
   principal. Nothing is allocated yet. One caller (``caller`` key: its tenant, or its connection
   without tokens) holds at most ``max_per_caller`` arenas and tickets, so it cannot take every slot.
2. The caller connects to the registry's Unix socket and writes the ticket. The registry creates a
   sealed memfd (:func:`service.wire.arena.create_memfd`), maps it, sends the fd with ``SCM_RIGHTS``
   (plus one byte) and closes its own copy of the fd: afterwards the server holds only the mapping,
   so even ``/proc/<server pid>/fd`` shows no way in. An unknown, used or expired ticket gets the
   connection closed, nothing else.
3. The connection stays open for the arena's life. When the caller closes it (or dies: the kernel
   closes it), the arena leaves the registry at once; calls still running on it fail, and its memory
   is released when the last of them has dropped its views. With a control server attached
   (:meth:`ArenaRegistry.serve_control`: ``service/server/shm_control.py``) the connection also carries
   the caller's ``PutShm``/``GetShm`` calls as frames, acting for the principal that opened the arena.

Calls (``PutShm``/``GetShm``) take an arena with :meth:`ArenaRegistry.use`, which checks the
principal: an arena id is useless to anyone but the principal that opened it. The caller manages the
arena's space (it names the ranges of each call); between calls the server holds only the unstored
pieces of multi-piece Puts (:class:`Upload`), each for at most ``lease_s`` seconds after its last
piece, and none of them past the arena's life.

Everything here runs on the server's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import struct
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from kvtier.service.server.auth import Principal
from kvtier.service.server.errors import QuotaExceeded, ShmUnavailable, UploadNotFound
from kvtier.service.wire.arena import Arena, align_up, create_memfd

log = logging.getLogger(__name__)

#: Seconds a ticket stays redeemable.
TICKET_S = 10.0
#: Seconds a connection may take to send its ticket.
HELLO_S = 5.0
#: Arenas open at once, all callers together (each costs address space, and memory as it is used).
MAX_ARENAS = 256
TICKET_BYTES = 32
#: Unfinished multi-piece Puts one arena may hold at once.
MAX_UPLOADS = 16
#: Arenas (and unredeemed tickets) one caller may hold at once, unless the registry is told otherwise.
MAX_ARENAS_PER_CALLER = 32


@dataclass(eq=False)
class Upload:
    """The pieces of a multi-piece ``PutShm`` received so far (copies: the caller reuses its ranges)."""

    plan: object  # service.server.put_assembly.PutPlan
    sizes: list[int]
    blocks: list = field(default_factory=list)
    checksums: list[int] = field(default_factory=list)
    timer: asyncio.TimerHandle | None = None
    #: its place among the open Puts (``service.server.quota.PutHold``), released when it ends
    hold: object | None = None

    def release(self) -> None:
        """End the upload's hold on the Put budget (idempotent)."""
        if self.hold is not None:
            self.hold.release()

    @property
    def nbytes(self) -> int:
        return sum(len(b) for b in self.blocks)


@dataclass(eq=False)
class ServerArena:
    """One caller's arena as the server holds it, and its unfinished uploads."""

    arena_id: str
    principal: Principal | None
    arena: Arena
    peer_pid: int
    caller: str = ""
    alive: bool = True
    #: set when the arena is dropped (stops its prefault thread)
    closed: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    uploads: dict[str, Upload] = field(default_factory=dict)

    def park(self, upload: Upload, lease_s: float, counters: Counter) -> str:
        """Hold ``upload`` until its next piece (:meth:`take`), for at most ``lease_s`` seconds.

        :returns: its id. :raises QuotaExceeded: when :data:`MAX_UPLOADS` are held already.
        """
        if len(self.uploads) >= MAX_UPLOADS:
            raise QuotaExceeded(f"{MAX_UPLOADS} unfinished shared-memory puts on this arena; finish one first",
                                subject="arena:uploads")
        upload_id = secrets.token_hex(8)

        def expire() -> None:
            expired = self.uploads.pop(upload_id, None)
            if expired is not None:
                expired.release()
                counters["uploads_expired"] += 1
                log.debug("arena %s…: upload %s expired after %.0f s without a next piece", self.arena_id[:8],
                          upload_id, lease_s)

        upload.timer = asyncio.get_running_loop().call_later(lease_s, expire)
        self.uploads[upload_id] = upload
        return upload_id

    def take(self, upload_id: str) -> Upload:
        """The parked upload ``upload_id``, no longer parked (the caller parks it again or finishes it).

        :raises UploadNotFound: if there is none (expired, finished, or never started).
        """
        upload = self.uploads.pop(upload_id, None)
        if upload is None:
            raise UploadNotFound(f"no unfinished put {upload_id[:16]!r} on this arena (finished, its lease "
                                 "expired, or it never started); put it again")
        upload.timer.cancel()
        return upload

    def drop_uploads(self) -> None:
        for upload in self.uploads.values():
            upload.timer.cancel()
            upload.release()
        self.uploads.clear()


@dataclass(frozen=True, slots=True)
class _Ticket:
    arena_id: str
    principal: Principal | None
    size: int
    expires: float
    caller: str = ""


class ArenaRegistry:
    """Arenas by id, and the Unix socket that delivers them.

    :param socket_path: where to listen; ``None``: a fresh private directory under the temp dir
        (mode 0700, so only this uid can connect; name a path to serve other uids).
    :param arena_bytes: size of each arena (and the most an ``OpenArena`` may ask for).
    :param lease_s: seconds the unfinished pieces of a multi-piece Put wait for the next piece.
    :param max_per_caller: arenas (with unredeemed tickets) one caller may hold (0 = no limit).

    Create and use it on the server's event loop; the socket starts listening with the first
    :meth:`issue` and :meth:`close` stops it and drops every arena.
    """

    def __init__(self, socket_path: str | os.PathLike | None, arena_bytes: int, *, lease_s: float = 30.0,
                 max_per_caller: int = MAX_ARENAS_PER_CALLER, prefault: bool = False) -> None:
        self.arena_bytes = int(arena_bytes)
        #: touch each arena's pages as it is handed out, on a background thread (``server.shm_prefault``)
        self.prefault = prefault
        self.lease_s = lease_s
        self.max_per_caller = max_per_caller
        self._path = os.fspath(socket_path) if socket_path is not None else None
        self._own_dir: str | None = None
        self._listener: socket.socket | None = None
        self._accept_task: asyncio.Task | None = None
        self._conns: set[asyncio.Task] = set()
        self._tickets: dict[bytes, _Ticket] = {}
        self._arenas: dict[str, ServerArena] = {}
        self._control = None
        self.counters: Counter[str] = Counter()

    @property
    def socket_path(self) -> str | None:
        return self._path

    def serve_control(self, control) -> None:
        """Serve calls as frames on every arena connection from now on: once its fd is handed,
        ``await control.serve(conn, arena)`` runs until the caller closes ``conn``."""
        self._control = control

    @property
    def control(self) -> bool:
        """Whether arena connections carry calls (``OpenArenaResponse.control``)."""
        return self._control is not None

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls on the arena connections (UNAVAILABLE) and give the ones in flight
        ``grace_s`` seconds to finish (then they are cancelled); see ``control.drain``."""
        if self._control is not None:
            await self._control.drain(grace_s)

    # -- control plane ------------------------------------------------------------------------------
    async def issue(self, principal: Principal | None, size: int = 0, *,
                    caller: str = "") -> tuple[str, bytes, str, int]:
        """A new arena id and ticket for ``principal``: ``(arena_id, ticket, socket_path, size)``.

        :param caller: whom the arena counts against (``max_per_caller``).
        :raises QuotaExceeded: when :data:`MAX_ARENAS` arenas are open or promised, or ``caller`` holds
            ``max_per_caller`` of them.
        :raises OSError: if the socket cannot be created.
        """
        await self._listen()
        now = time.monotonic()
        self._tickets = {t: v for t, v in self._tickets.items() if v.expires > now}
        if len(self._arenas) + len(self._tickets) >= MAX_ARENAS:
            raise QuotaExceeded(f"{MAX_ARENAS} shared-memory arenas are open; use the gRPC streams",
                                subject="server:arenas")
        held = sum(a.caller == caller for a in self._arenas.values()) + sum(
            t.caller == caller for t in self._tickets.values())
        if self.max_per_caller and held >= self.max_per_caller:
            raise QuotaExceeded(f"this caller holds {held} shared-memory arenas, the most allowed "
                                "(server.shm_arenas_per_caller); close one, or use the gRPC streams",
                                subject="caller:arenas")
        size = min(self.arena_bytes, size or self.arena_bytes)
        size = align_up(size)
        arena_id, ticket = secrets.token_hex(16), secrets.token_bytes(TICKET_BYTES)
        self._tickets[ticket] = _Ticket(arena_id, principal, size, now + TICKET_S, caller)
        return arena_id, ticket, self._path, size

    @contextlib.contextmanager
    def use(self, arena_id: str, principal: Principal | None):
        """The caller's live arena for the duration of one call.

        :raises ShmUnavailable: if there is no such arena (never opened, closed, or reclaimed) or it
            belongs to another principal (answered the same way: an id tells a stranger nothing).
        """
        found = self._arenas.get(arena_id)
        if found is None or not found.alive or found.principal != principal:
            raise ShmUnavailable("no such shared-memory arena for this caller (closed, reclaimed or never "
                                 "opened); call OpenArena again")
        found.calls += 1
        try:
            yield found
        finally:
            found.calls -= 1

    def stats(self) -> dict[str, int]:
        """Counters for ``Stats``: arenas open, unfinished uploads and the bytes they hold now, and
        totals since start."""
        out = {f"shm_{k}": v for k, v in self.counters.items()}
        out["shm_arenas_open"] = len(self._arenas)
        out["shm_uploads_open"] = sum(len(a.uploads) for a in self._arenas.values())
        out["shm_upload_bytes"] = sum(u.nbytes for a in self._arenas.values() for u in a.uploads.values())
        return out

    # -- the socket ---------------------------------------------------------------------------------
    async def _listen(self) -> None:
        if self._listener is not None:
            return
        if self._path is None:
            self._own_dir = tempfile.mkdtemp(prefix="kvtier-shm-")  # 0700
            self._path = os.path.join(self._own_dir, "arena.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)  # a stale socket of an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(self._path)
        sock.listen(64)
        sock.setblocking(False)
        self._listener = sock
        self._accept_task = asyncio.get_running_loop().create_task(self._accept())
        log.info("shared-memory arenas served on %s (%d MiB each)", self._path, self.arena_bytes >> 20)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._listener)
            task = loop.create_task(self._serve_conn(conn))
            self._conns.add(task)
            task.add_done_callback(self._conns.discard)

    async def _serve_conn(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        arena: ServerArena | None = None
        try:
            conn.setblocking(False)
            ticket = b""
            async with asyncio.timeout(HELLO_S):
                while len(ticket) < TICKET_BYTES:
                    got = await loop.sock_recv(conn, TICKET_BYTES - len(ticket))
                    if not got:
                        return
                    ticket += got
            promised = self._tickets.pop(ticket, None)
            if promised is None or promised.expires < time.monotonic():
                self.counters["tickets_refused"] += 1
                return
            pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
            fd = create_memfd(promised.size)
            try:
                mapped = Arena(fd, promised.size)
                # one byte plus the fd; a fresh socket's buffer always takes it, so this never blocks
                socket.send_fds(conn, [b"\x01"], [fd])
            finally:
                os.close(fd)  # the server keeps only the mapping
            arena = ServerArena(promised.arena_id, promised.principal, mapped, pid, promised.caller)
            if self.prefault:  # reads only, stopped when the arena is dropped
                mapped.prefault_in_background(arena.closed)
            self._arenas[arena.arena_id] = arena
            self.counters["arenas_opened"] += 1
            log.debug("arena %s… (%d bytes) handed to pid %d", arena.arena_id[:8], promised.size, pid)
            if self._control is not None:
                await self._control.serve(conn, arena)
            else:
                while await loop.sock_recv(conn, 4096):  # the caller sends nothing more: wait for its close
                    pass
        except (OSError, TimeoutError) as exc:
            log.debug("arena connection ended: %s", exc)
        finally:
            conn.close()
            if arena is not None:
                self._drop(arena)

    def _drop(self, arena: ServerArena) -> None:
        """Forget ``arena`` and its unfinished uploads: new calls cannot use it; its memory goes with the
        last view (Python reference counting keeps it mapped while a copy runs)."""
        arena.alive = False
        arena.closed.set()
        arena.drop_uploads()
        if self._arenas.pop(arena.arena_id, None) is not None:
            self.counters["arenas_reclaimed"] += 1
            log.debug("arena %s… reclaimed (peer pid %d closed it)", arena.arena_id[:8], arena.peer_pid)

    async def close(self) -> None:
        """Stop listening, drop every arena and remove the socket (and its directory if it made one)."""
        if self._accept_task is not None:
            self._accept_task.cancel()
        for task in list(self._conns):
            task.cancel()
        await asyncio.gather(*self._conns, return_exceptions=True)
        for arena in list(self._arenas.values()):
            self._drop(arena)
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(OSError):
                os.unlink(self._path)
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
