"""ControlServer: ``PutShm``/``GetShm`` served as frames over each arena's Unix socket, without gRPC's per-call cost.

May import ``service.wire``, ``service.server`` (core, errors, offload, shm_broker, shm_rpc, telemetry) and grpc.

Once :class:`~service.server.shm_broker.ArenaRegistry` has handed a caller its arena's fd, the same
connection carries that caller's calls (frame format: ``service/wire/control.py``), read by an
``asyncio.Protocol`` on the server's event loop. Each call is run by the same code as its gRPC RPC
(:func:`service.server.shm_rpc.put_shm` / ``get_shm``: tenant checks, quotas and limits, the chain
read) and around it the same machinery as gRPC's interceptors:

* **auth**: the connection acts for the principal that opened the arena (``ServerArena.principal``),
  and only on its arenas (``ArenaRegistry.use`` checks every arena id against it); no token travels.
  A SIGHUP that removes every token of that principal stops its calls (UNAUTHENTICATED);
* **errors**: whatever a call raises is answered with the one mapping of ``service/server/errors.py``
  (``status_proto``: code, message, ``google.rpc`` details) and logged once (``log_error``);
* **limits**: each call counts against ``server.max_concurrent_rpcs`` with the gRPC calls
  (``ErrorBoundary.admitted``); the caller's timeout becomes the call's deadline, and a call past it is
  answered DEADLINE_EXCEEDED, as gRPC would;
* **telemetry**: the same SERVER span ``/kvtier.v1.KVCache/<M>`` (child of the frame's
  ``traceparent``, attribute ``kvtier.transport`` = ``unix-control``) and the same
  ``kvtier_rpc_duration_seconds`` observation (``ServerTelemetryInterceptor.begin``); log lines of the
  call carry its trace id;
* **drain**: :meth:`ControlServer.drain` refuses new calls with UNAVAILABLE and waits for those in
  flight.

Malformed input: an unknown method id is answered UNIMPLEMENTED and a request message that does not
parse INVALID_ARGUMENT (``BadRequest`` field ``request``), both keeping the connection; a frame whose
length or version cannot be trusted is answered (INVALID_ARGUMENT, or RESOURCE_EXHAUSTED for one over
``server.max_message_bytes``) and the connection closed, which drops the arena; a truncated frame
is dropped with the connection. None of this reaches another caller's arena or data.
"""

from __future__ import annotations

import asyncio
import logging
import math
import socket
import time

import grpc

from kvtier.service.server import offload, shm_rpc
from kvtier.service.server.core import Caller, ServerCore
from kvtier.service.server.errors import (DeadlineExceeded, Draining, ErrorBoundary, QuotaExceeded, Unimplemented,
                                          log_error, status_proto)
from kvtier.service.server.shm_broker import ArenaRegistry, ServerArena
from kvtier.service.server.telemetry import ServerTelemetryInterceptor
from kvtier.service.wire import control as wire
from kvtier.service.wire import convert
from kvtier.tiering.errors import InvalidBlock

log = logging.getLogger(__name__)

SERVICE = "kvtier.v1.KVCache"
#: Span attributes that tell a socket call's span from a gRPC call's.
TRANSPORT = {"kvtier.transport": "unix-control", "network.transport": "unix"}
_CODES = {c.value[0]: c for c in grpc.StatusCode}
#: Most blocks of a GetShm served in place on the event loop when all sit in host memory (offload.py).
INLINE_BLOCKS = 4


class ControlServer:
    """Serves the frames of every arena connection of ``shm`` (attach with ``shm.serve_control(server)``).

    :param core: the handlers' shared core (store, auth, limits).
    :param shm: the arenas the frames name.
    :param boundary: the gRPC server's error boundary, whose concurrency limit these calls share.
    :param telemetry: the gRPC server's telemetry interceptor (``None``: no spans or RPC metrics).
    :param max_frame_bytes: the largest frame accepted (the server's ``max_message_bytes``).

    Use it on the server's event loop.
    """

    def __init__(self, core: ServerCore, shm: ArenaRegistry, boundary: ErrorBoundary,
                 telemetry: ServerTelemetryInterceptor | None, max_frame_bytes: int) -> None:
        self.core = core
        self.shm = shm
        self.boundary = boundary
        self.telemetry = telemetry
        self.max_frame_bytes = max_frame_bytes
        self.draining = False
        self._calls: set[asyncio.Task] = set()
        self._handlers = {"PutShm": self._put, "GetShm": self._get}

    async def serve(self, conn: socket.socket, arena: ServerArena) -> None:
        """Serve ``conn``'s frames, for ``arena``'s principal, until the caller closes it (or a frame
        that cannot be trusted closes it here). Calls still running then finish without a reply."""
        loop = asyncio.get_running_loop()
        closed = loop.create_future()
        transport, _ = await loop.connect_accepted_socket(lambda: _Connection(self, arena, closed), sock=conn)
        try:
            await closed
        finally:
            transport.close()

    async def drain(self, grace_s: float) -> None:
        """Refuse new calls (UNAVAILABLE) and wait up to ``grace_s`` seconds for those in flight, then
        cancel the rest (a cancelled Put stores nothing)."""
        self.draining = True
        if self._calls:
            _done, late = await asyncio.wait(set(self._calls), timeout=grace_s)
            for task in late:
                task.cancel()
            await asyncio.gather(*late, return_exceptions=True)

    def start(self, conn: "_Connection", fields: tuple, payload: bytes) -> None:
        """Run one request frame's call on its own task (several may be in flight on one connection)."""
        task = asyncio.get_running_loop().create_task(self._call(conn, fields, payload))
        self._calls.add(task)
        task.add_done_callback(self._calls.discard)

    async def _call(self, conn: "_Connection", fields: tuple, payload: bytes) -> None:
        _length, method_id, _version, trace_len, request_id, timeout_s = fields
        name = wire.METHODS[method_id][0] if method_id in wire.METHODS else ""
        full = f"/{SERVICE}/{name or 'unknown'}"
        # as over gRPC, a method the server does not serve gets no span and no RPC metrics
        observation = (self.telemetry.begin(full, name, wire.decode_trace(payload[:trace_len]), TRANSPORT)
                       if self.telemetry is not None and name else None)
        error, code = None, grpc.StatusCode.OK
        try:
            body = await self._answer(conn.arena, method_id, name, timeout_s, payload[trace_len:])
        except asyncio.CancelledError as exc:  # drained past its grace: no reply, as gRPC cancels
            if observation is not None:
                observation.end(grpc.StatusCode.CANCELLED, exc)
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary of this path: every error is answered here
            error = exc
            log_error(full, exc)
            status = status_proto(exc)
            code, body = _CODES.get(status.code, grpc.StatusCode.UNKNOWN), status.SerializeToString()
        if observation is not None:
            observation.end(code, error)
        conn.reply(method_id, request_id, code.value[0], body)

    async def _answer(self, arena: ServerArena, method_id: int, name: str, timeout_s: float, body: bytes) -> bytes:
        """The serialized response of one call, or the error it ends with."""
        if self.draining:
            raise Draining("the server is shutting down; call again once it is back")
        handler = self._handlers.get(name)
        if handler is None:
            raise Unimplemented(f"method id {method_id} is not served on this socket (PutShm is 1, GetShm 2)")
        if math.isnan(timeout_s) or timeout_s < 0:
            raise InvalidBlock(f"timeout {timeout_s} s is not a duration", field="frame.timeout")
        request = wire.METHODS[method_id][1].FromString(body)  # DecodeError: INVALID_ARGUMENT (request)
        self.core.auth.still_admits(arena.principal)
        caller = Caller.of(arena.principal)
        self.shm.counters["control_calls"] += 1
        with self.boundary.admitted():
            if not timeout_s or math.isinf(timeout_s):
                return (await handler(request, caller, None)).SerializeToString()
            deadline = time.monotonic() + timeout_s
            try:
                async with asyncio.timeout(timeout_s):
                    return (await handler(request, caller, deadline)).SerializeToString()
            except TimeoutError:
                if time.monotonic() < deadline:
                    raise  # a timeout of the handler's own, not the caller's deadline
                raise DeadlineExceeded("Deadline Exceeded") from None

    async def _put(self, request, caller: Caller, deadline: float | None):
        return await shm_rpc.put_shm(self.core, self.shm, request, caller)

    async def _get(self, request, caller: Caller, deadline: float | None):
        if not self._in_host_memory(request.request):
            return await shm_rpc.get_shm(self.core, self.shm, request, caller, deadline)
        self.shm.counters["control_inline"] += 1
        with offload.inline():  # a copy and a checksum of a few blocks: cheaper than two thread hand-offs
            return await shm_rpc.get_shm(self.core, self.shm, request, caller, deadline)

    def _in_host_memory(self, request) -> bool:
        """Whether a Get names at most :data:`INLINE_BLOCKS` keys, each held by a host-memory tier now
        (a peek under the tiers' own short locks; no slow tier is asked). A block evicted between this
        look and the copy is read from below on the loop: one block, rarely."""
        if request.WhichOneof("target") != "keys" or not 0 < len(request.keys.keys) <= INLINE_BLOCKS:
            return False
        try:
            keys = convert.keys_from_proto(request.keys.keys, "keys.keys")
        except InvalidBlock:
            return False  # the handler answers it, naming the field
        missing = keys
        for tier in self.core.store.memory:
            if tier.device.type != "cpu":
                continue  # a device tier's copy out synchronises with the GPU: not on the loop
            missing = [k for k, here in zip(missing, tier.contains_many(missing)) if not here]
            if not missing:
                return True
        return False

    def refuse(self, conn: "_Connection", exc: wire.FrameError) -> None:
        """Answer a frame that cannot be trusted, then close its connection (module docstring)."""
        if exc.oversize:
            error: Exception = QuotaExceeded(f"{exc}; send smaller requests", subject="server:max_message_bytes")
        else:
            error = InvalidBlock(f"malformed frame: {exc}", field="frame")
        log_error(f"/{SERVICE}/(frame)", error)
        status = status_proto(error)
        conn.reply(0, exc.request_id, status.code, status.SerializeToString())
        conn.close()


class _Connection(asyncio.Protocol):
    """One arena connection: frames in, replies out (each written whole, so replies never interleave)."""

    def __init__(self, server: ControlServer, arena: ServerArena, closed: asyncio.Future) -> None:
        self.server = server
        self.arena = arena
        self._closed = closed
        self._reader = wire.FrameReader(wire.REQUEST, server.max_frame_bytes)
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self._transport = transport

    # A caller that sends calls but does not read their replies stops being read from, rather than
    # growing the server's write buffer without bound (asyncio calls these at its buffer's water marks).
    def pause_writing(self) -> None:
        self._transport.pause_reading()

    def resume_writing(self) -> None:
        self._transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        reader = self._reader
        reader.feed(data)
        while True:
            try:
                frame = reader.next()
            except wire.FrameError as exc:
                self.server.refuse(self, exc)
                return
            if frame is None:
                return
            fields, payload = frame
            if fields[2] != wire.VERSION or fields[3] > len(payload):
                self.server.refuse(self, wire.FrameError(
                    f"version {fields[2]} (want {wire.VERSION}), trace of {fields[3]} bytes in a "
                    f"{len(payload)}-byte payload", request_id=fields[4]))
                return
            self.server.start(self, fields, payload)

    def reply(self, method_id: int, request_id: int, code: int, body: bytes) -> None:
        if self._transport is not None and not self._transport.is_closing():
            self._transport.write(wire.encode_reply(method_id, request_id, code, body))

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def connection_lost(self, exc) -> None:
        if exc is not None:
            log.debug("arena connection lost: %s", exc)
        if not self._closed.done():
            self._closed.set_result(None)
