"""The control frames of the same-host path: ``PutShm``/``GetShm`` messages over an arena's Unix socket.

Imports the generated messages only; both ends (``service/server/shm_control.py``,
``service/client/shm_control.py``) share it.

Once the server has handed a caller its arena's fd (``service/server/shm_broker.py``) and said so in
``OpenArenaResponse.control``, the same socket carries the caller's ``PutShm``/``GetShm`` calls as
length-prefixed frames, several in flight at once (replies may come back in any order; a request id
pairs them). All integers little-endian::

    request  = u32 length | u8 method | u8 version | u16 trace_len | u32 request_id | f64 timeout_s
               | trace (trace_len bytes) | the request message
    reply    = u32 length | u8 method | u8 code | u16 reserved | u32 request_id
               | the response message (code 0) or a serialized google.rpc.Status (any other code)

``length`` counts the bytes after itself. ``timeout_s`` is the caller's deadline from now (0: none).
``trace`` is the caller's W3C ``traceparent``, then ``\\n`` and its ``tracestate`` if it has one
(ASCII; empty: not traced). ``code`` is a ``grpc.StatusCode`` number, the Status the same
``code``/``message``/``details`` a gRPC call would have answered.
"""

from __future__ import annotations

import struct

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb

REQUEST = struct.Struct("<IBBHId")
REPLY = struct.Struct("<IBBHI")
LENGTH = struct.Struct("<I")
#: The version byte of every request frame this module writes (others are refused).
VERSION = 1
#: Method id -> (method name, request type, response type).
METHODS: dict[int, tuple[str, type, type]] = {
    1: ("PutShm", pb.PutShmRequest, pb.PutShmResponse),
    2: ("GetShm", pb.GetShmRequest, pb.GetShmResponse),
}
METHOD_IDS = {name: mid for mid, (name, _req, _resp) in METHODS.items()}
#: Keys of the W3C trace context a frame carries, in order.
TRACE_KEYS = ("traceparent", "tracestate")


class FrameError(ValueError):
    """Bytes that are not a frame. The stream cannot be resynchronised after one: close it.

    :ivar request_id: the frame's request id when its header was readable, else 0.
    :ivar oversize: whether the frame declared more bytes than the reader accepts.
    """

    def __init__(self, message: str, *, request_id: int = 0, oversize: bool = False) -> None:
        super().__init__(message)
        self.request_id = request_id
        self.oversize = oversize


def encode_request(method_id: int, request_id: int, timeout_s: float | None, trace: bytes, body: bytes) -> bytes:
    """One request frame (module docstring)."""
    head = REQUEST.pack(REQUEST.size - 4 + len(trace) + len(body), method_id, VERSION, len(trace), request_id,
                        timeout_s or 0.0)
    return b"".join((head, trace, body))


def encode_reply(method_id: int, request_id: int, code: int, body: bytes) -> bytes:
    """One reply frame (module docstring)."""
    return REPLY.pack(REPLY.size - 4 + len(body), method_id, code, 0, request_id) + body


def encode_trace(carrier: dict[str, str]) -> bytes:
    """The ``trace`` field of a request for a propagator's carrier (empty when not traced)."""
    parent = carrier.get("traceparent")
    if not parent:
        return b""
    state = carrier.get("tracestate")
    return (parent if not state else f"{parent}\n{state}").encode("ascii", "replace")


def decode_trace(raw: bytes) -> dict[str, str]:
    """A propagator's carrier from a request's ``trace`` field (what it cannot read, it drops)."""
    if not raw:
        return {}
    return dict(zip(TRACE_KEYS, raw.decode("ascii", "replace").split("\n", 1)))


class FrameReader:
    """Splits a byte stream into frames with header ``head`` (:data:`REQUEST` or :data:`REPLY`).

    :param max_bytes: the most bytes one frame may declare after its length field.

    Feed it what the socket gives, then take frames with :meth:`next` until it returns ``None``.
    Not thread-safe: one reader per stream.
    """

    def __init__(self, head: struct.Struct, max_bytes: int) -> None:
        self._head = head
        self._max = max_bytes
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data) -> None:
        if self._pos:
            del self._buf[:self._pos]
            self._pos = 0
        self._buf += data

    def next(self) -> tuple[tuple, bytes] | None:
        """The next whole frame: ``(its header fields, the bytes after the header)``, or ``None``.

        :raises FrameError: for a length shorter than the header or longer than ``max_bytes``.
        """
        buf, pos, head = self._buf, self._pos, self._head
        if len(buf) - pos < head.size:
            return None
        fields = head.unpack_from(buf, pos)
        length = fields[0]
        if length > self._max:
            raise FrameError(f"a frame of {length} bytes is over this socket's limit of {self._max}",
                             request_id=fields[4], oversize=True)
        if length < head.size - 4:
            raise FrameError(f"a frame length of {length} is shorter than its {head.size - 4}-byte header",
                             request_id=fields[4])
        end = pos + 4 + length
        if len(buf) < end:
            return None
        self._pos = end
        return fields, bytes(buf[pos + head.size:end])

    @property
    def pending(self) -> int:
        """Bytes received but not yet taken as frames (a partial frame at the stream's end)."""
        return len(self._buf) - self._pos
