"""ControlChannel: the client's ``PutShm``/``GetShm`` calls as frames over its arena's Unix socket.

Imports wire/ (frames), the client's types and requests (errors), and grpc's status codes.

A server that says ``OpenArenaResponse.control`` serves those calls on the socket the arena's fd came
over (``service/server/shm_control.py``), acting for the principal that opened the arena: no token is
sent, no HTTP/2 is spoken, and a call costs one small write and one small read. Several calls may be in
flight (request ids pair the replies, which may come back in any order).

A call is started with :meth:`ControlChannel.start` and its :class:`Pending` waited for by the driver
running it (``service/client/steps.py``): the blocking driver calls :meth:`Pending.result`, the asyncio
driver awaits it. One reader thread per channel reads the replies and completes each call's
``concurrent.futures.Future`` (an awaiting task is woken with ``call_soon_threadsafe``). Measured here:
a blocking caller reading the socket itself would save ~18 us a call (~500 us in all); an event loop
reading it (``add_reader``, no thread) halved the throughput of 32 asyncio clients in one process and
raised their p50 and p99, so both drivers use the thread. Errors are the :class:`KVTierClientError` (code, message, ``google.rpc`` details) the
same call over gRPC would raise. ``KVTIER_SHM_CONTROL=grpc`` in the environment keeps the calls on gRPC
(:func:`wanted`), e.g. to compare the two.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import logging
import os
import socket
import threading

import grpc
from google.rpc import status_pb2

from kvtier.service.client.requests import status_error
from kvtier.service.client.types import KVTierClientError
from kvtier.service.wire import control as wire

log = logging.getLogger(__name__)

#: Environment variable choosing where a same-host client's PutShm/GetShm go: ``socket`` (default) or ``grpc``.
ENV = "KVTIER_SHM_CONTROL"
#: Largest request sent over the socket: under the smallest ``max_message_bytes`` a server may have (2 MiB).
MAX_REQUEST_BYTES = (2 << 20) - 4096
#: Largest reply frame accepted (a GetShm answer of thousands of blocks' headers stays far below).
MAX_REPLY_BYTES = 64 << 20
_CODES = {c.value[0]: c for c in grpc.StatusCode}


def wanted() -> bool:
    """Whether calls should use the socket when the server offers it (``KVTIER_SHM_CONTROL`` != ``grpc``)."""
    return os.environ.get(ENV, "socket").strip().lower() != "grpc"


class Pending:
    """One call in flight: wait for it with :meth:`result` (blocking) or ``await`` (asyncio), once."""

    __slots__ = ("_channel", "_rid", "_future", "_timeout")

    def __init__(self, channel: "ControlChannel", rid: int, future: concurrent.futures.Future,
                 timeout: float | None) -> None:
        self._channel, self._rid, self._future, self._timeout = channel, rid, future, timeout

    def result(self):
        """The response message. :raises KVTierClientError: the call's error; ``DEADLINE_EXCEEDED``
        when no reply came within the timeout (the reply is then ignored)."""
        try:
            return self._future.result(self._timeout)
        except concurrent.futures.TimeoutError:
            raise self._expired() from None

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        on_loop = threading.get_ident()

        def done(future: concurrent.futures.Future) -> None:  # on the loop if the reply came already
            if threading.get_ident() == on_loop:
                _settle(waiter, future)
            else:
                loop.call_soon_threadsafe(_settle, waiter, future)

        self._future.add_done_callback(done)
        timer = loop.call_later(self._timeout, _settle, waiter, None) if self._timeout is not None else None
        try:
            return await waiter
        except TimeoutError:
            raise self._expired() from None
        except asyncio.CancelledError:
            self._channel.forget(self._rid)
            raise
        finally:
            if timer is not None:
                timer.cancel()

    def _expired(self) -> KVTierClientError:
        self._channel.forget(self._rid)
        return KVTierClientError(grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")


def _settle(waiter: asyncio.Future, future: concurrent.futures.Future | None) -> None:
    """Give ``waiter`` the outcome of ``future`` (``None``: the timeout passed), unless it has one."""
    if waiter.done():
        return
    if future is None:
        waiter.set_exception(TimeoutError())
    elif (error := future.exception()) is not None:
        waiter.set_exception(error)
    else:
        waiter.set_result(future.result())


class ControlChannel:
    """The calls of one arena socket. Thread-safe; :meth:`close` it (which closes the socket).

    :param sock: the connected arena socket, its fd already received (blocking mode).
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._pending: dict[int, tuple[concurrent.futures.Future, type]] = {}
        self._ids = itertools.count(1)
        self._lost: str | None = None  # why the channel can carry no more calls
        self._frames = wire.FrameReader(wire.REPLY, MAX_REPLY_BYTES)
        self._reader = threading.Thread(target=self._read, name="kvtier-shm-control", daemon=True)
        self._reader.start()

    def start(self, request, *, method: str, timeout: float | None, trace: dict[str, str]) -> Pending:
        """Send one call of ``method`` (``PutShm``/``GetShm``) and return what waits for its reply.

        :param trace: the W3C trace context to carry (``traceparent``, ``tracestate``; empty: none).
        :raises KVTierClientError: ``FAILED_PRECONDITION`` when the socket is gone (the server forgot
            the arena: the caller opens a new one), as the same call over gRPC answers.
        """
        method_id = wire.METHOD_IDS[method]
        future: concurrent.futures.Future = concurrent.futures.Future()
        rid = next(self._ids) & 0xFFFFFFFF
        frame = wire.encode_request(method_id, rid, timeout, wire.encode_trace(trace), request.SerializeToString())
        self._pending[rid] = (future, wire.METHODS[method_id][2])
        try:
            with self._send_lock:
                if self._lost is not None:
                    raise OSError(self._lost)
                self._sock.sendall(frame)
        except OSError as exc:
            self._pending.pop(rid, None)
            raise KVTierClientError(grpc.StatusCode.FAILED_PRECONDITION,
                                    f"the shared-memory arena's socket is closed ({exc}); open a new arena") from None
        return Pending(self, rid, future, timeout)

    def forget(self, rid: int) -> None:
        """Stop waiting for call ``rid`` (timed out or cancelled): its reply, if one comes, is dropped."""
        self._pending.pop(rid, None)

    def takes(self, request) -> bool:
        """Whether ``request`` should go over this channel: it is open, and the request is at most
        :data:`MAX_REQUEST_BYTES` (a larger one, e.g. a Put header of a million token ids, goes over gRPC,
        whose limits the caller configured)."""
        return self._lost is None and request.ByteSize() <= MAX_REQUEST_BYTES

    def close(self) -> None:
        """Close the socket (the server drops the arena); calls still waiting fail UNAVAILABLE."""
        with self._send_lock:
            self._lost = self._lost or "closed by the client"
        try:
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the reader thread, which fails what waits
        except OSError:
            pass
        self._sock.close()

    def _read(self) -> None:
        buf = bytearray(1 << 16)
        why = "the server closed the arena's socket"
        try:
            while n := self._sock.recv_into(buf):
                self._feed(memoryview(buf)[:n])
        except (OSError, wire.FrameError) as exc:
            why = f"the arena's socket failed: {exc}"
        self._fail(why)

    def _feed(self, data) -> None:
        self._frames.feed(data)
        while (frame := self._frames.next()) is not None:
            self._complete(*frame)

    def _fail(self, why: str) -> None:
        """No more replies will come: every call still waiting fails UNAVAILABLE."""
        with self._send_lock:
            self._lost = self._lost or why
        pending, self._pending = self._pending, {}
        for future, _ in pending.values():
            if not future.done():
                future.set_exception(KVTierClientError(grpc.StatusCode.UNAVAILABLE, self._lost))

    def _complete(self, fields: tuple, body: bytes) -> None:
        _length, _method, code, _reserved, rid = fields
        entry = self._pending.pop(rid, None)
        if entry is None:
            if rid == 0 and code:  # the server refused a frame it could not read, and closes the socket
                log.warning("the server refused a control frame: %s", status_pb2.Status.FromString(body).message)
            return
        future, response_type = entry
        if future.done():  # cancelled meanwhile
            return
        try:
            if code == 0:
                future.set_result(response_type.FromString(body))
            else:
                future.set_exception(status_error(_CODES.get(code, grpc.StatusCode.UNKNOWN),
                                                  status_pb2.Status.FromString(body)))
        except Exception as exc:  # noqa: BLE001 - a reply that does not parse fails its call, not the reader
            if not future.done():
                future.set_exception(KVTierClientError(grpc.StatusCode.INTERNAL, f"unreadable reply: {exc}"))
