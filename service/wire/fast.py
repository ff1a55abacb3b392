"""Fast codecs for the payload messages of Get and Put: protobuf's exact bytes, without protobuf.

A Get streams ``GetResponse{data}`` messages and a Put ``PutRequest{chunk}`` messages of up to 1 MiB
each; going through protobuf costs a message build, a serialisation and a parse per chunk, each a
full copy of the payload (measured: half of the server's time in a Get). The wire format does not
change: these functions write and read exactly the bytes protobuf would, so any standard gRPC client
or server of ``kvtier.v1`` interoperates (``tests/service/wire/test_wire_fast.py`` checks every encoding
against ``SerializeToString`` and every decoding against ``FromString``).

Encodings (proto3, fields in field-number order, zero scalars omitted, as protobuf emits them)::

    GetResponse{data=P[, last=E]}       0x12 varint(len P) P [0x2a varint(len E) E]
    GetResponse{header=H[, header_data=P][, last=E]}
                                        0x0a varint(len H) H [0x22 varint(len P) P] [0x2a varint(len E) E]
    PutRequest{chunk=BlockChunk{i,o,P,c}}  0x12 varint(len C) C,  C = [0x08 varint(i)] [0x10 varint(o)]
                                                                 [0x1a varint(len P) P] [0x20 varint(c)]
    PutRequest{header=H, first_chunk=C} 0x0a varint(len H) H 0x1a varint(len C) C

(``H`` and ``E``, small messages, are protobuf's own serialisations.) The one-message forms
(``header_data``, ``last``, ``first_chunk``) are sent only to a peer that said it reads them
(``GetRequest.inline_data``, ``PutResponse.accepts_first_chunk``).

Primitives:

* :func:`encode_get_data` / :func:`encode_get_block` / :func:`encode_put_chunk` /
  :func:`encode_put_first`: a payload chunk as its message's encoding, in one copy of the payload (the
  copy ``bytes(view[a:b])`` made before);
* :func:`serialize_get_response` / :func:`serialize_put_request`: serializers that send such ``bytes``
  as they are and any message object through ``SerializeToString``;
* :func:`decode_get_response` / :func:`decode_put_request`: deserializers that recognise a payload
  message by its bytes and return a :class:`DataFrame`, :class:`HeaderFrame` / :class:`ChunkFrame`,
  :class:`PutHeaderFrame` (a message-shaped view of the payload, no copy), and parse every other
  message with ``FromString`` (so anything that
  does not match, e.g. unknown fields or an unusual field order, still parses exactly as protobuf
  would, errors included);
* :class:`FastKVCacheStub` (client) and :func:`fast_handlers` (server): Get and Put with these codecs.

Thread-safe: everything here is a pure function or an immutable value.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc

#: Key of field 2, wire type 2 (length-delimited): ``GetResponse.data`` and ``PutRequest.chunk``.
_TAG_F2_LEN = 0x12
_TAG_INDEX, _TAG_OFFSET, _TAG_DATA, _TAG_CHECKSUM = 0x08, 0x10, 0x1A, 0x20
#: Keys of length-delimited fields 1, 3, 4, 5: ``GetResponse.header``/``PutRequest.header``,
#: ``PutRequest.first_chunk``, ``GetResponse.header_data``, ``GetResponse.last``.
_TAG_F1_LEN, _TAG_F3_LEN, _TAG_F4_LEN, _TAG_F5_LEN = 0x0A, 0x1A, 0x22, 0x2A
_U32 = 1 << 32
_U64 = 1 << 64
#: Varint encodings of 0..127 (a chunk's small fields), precomputed.
_SMALL = [bytes((n,)) for n in range(128)]
_EMPTY = b""


def varint(n: int) -> bytes:
    """The base-128 varint of ``0 <= n < 2**64``, as protobuf writes it (shortest form)."""
    if n < 128:
        return _SMALL[n]
    out = bytearray()
    while n >= 128:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _read_varint(buf: bytes, pos: int, end: int) -> tuple[int, int]:
    """``(value, next position)`` of the varint at ``buf[pos]``; ``(-1, pos)`` if it is cut off by
    ``end`` or longer than 10 bytes (protobuf refuses those; the caller falls back to it)."""
    value = shift = 0
    for i in range(pos, min(end, pos + 10)):
        b = buf[i]
        value |= (b & 0x7F) << shift
        if b < 128:
            return value, i + 1
        shift += 7
    return -1, pos


# -- Get ---------------------------------------------------------------------------------------------
def _field(tag: int, value) -> tuple:
    """The parts of one ``bytes`` field (none for an empty value, as protobuf omits it)."""
    return (bytes((tag,)), varint(len(value)), value) if len(value) else ()


def _message(tag: int, msg) -> tuple:
    """The parts of one message field that is set (protobuf writes it even when empty)."""
    body = msg.SerializeToString()
    return bytes((tag,)), varint(len(body)), body


def encode_get_data(payload, last: pb.GetEnd | None = None) -> bytes:
    """``GetResponse(data=payload[, last=last]).SerializeToString()``, in one copy of ``payload`` (any
    bytes-like)."""
    tail = _message(_TAG_F5_LEN, last) if last is not None else ()
    return b"".join((b"\x12", varint(len(payload)), payload, *tail))


def encode_get_block(header: pb.BlockHeader, payload=_EMPTY, last: pb.GetEnd | None = None) -> bytes:
    """``GetResponse(header=header, header_data=payload[, last=last]).SerializeToString()``, in one copy
    of ``payload`` (any bytes-like, at most a chunk)."""
    tail = _message(_TAG_F5_LEN, last) if last is not None else ()
    return b"".join((*_message(_TAG_F1_LEN, header), *_field(_TAG_F4_LEN, payload), *tail))


def serialize_get_response(msg: pb.GetResponse | bytes) -> bytes:
    """Response serializer of Get: ``bytes`` are an encoded ``GetResponse`` already and go as they are."""
    return msg if type(msg) is bytes else msg.SerializeToString()


class DataFrame:
    """A ``GetResponse`` of ``data`` (and maybe ``last``), as :func:`decode_get_response` returns it.

    It answers the part of the message API that readers of a Get stream use: ``WhichOneof("msg")``
    is ``"data"``, ``data`` is the payload as a ``memoryview`` of the received bytes (no copy;
    assignable, like the message's field), ``last`` the ``GetEnd`` sent with it (``HasField("last")``).
    """

    __slots__ = ("data", "_last")

    def __init__(self, data: memoryview | bytes, last: pb.GetEnd | None = None) -> None:
        self.data = data
        self._last = last

    @property
    def last(self) -> pb.GetEnd:
        return self._last if self._last is not None else pb.GetEnd()

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 (the protobuf method's name)
        return "data" if group == "msg" else None

    def HasField(self, name: str) -> bool:  # noqa: N802
        return name in ("data", "msg") or (name == "last" and self._last is not None)


class HeaderFrame(DataFrame):
    """A ``GetResponse`` of ``header`` (and maybe ``header_data``, ``last``), as
    :func:`decode_get_response` returns it: ``header`` is the parsed ``BlockHeader``, ``header_data``
    a ``memoryview`` of the received bytes (no copy), the rest as :class:`DataFrame`."""

    __slots__ = ("header",)

    def __init__(self, header: pb.BlockHeader, data: memoryview | bytes, last: pb.GetEnd | None) -> None:
        super().__init__(data, last)
        self.header = header

    @property
    def header_data(self) -> memoryview | bytes:
        return self.data

    @header_data.setter
    def header_data(self, value: memoryview | bytes) -> None:
        self.data = value

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802
        return "header" if group == "msg" else None

    def HasField(self, name: str) -> bool:  # noqa: N802
        return name in ("header", "msg") or (name == "header_data" and len(self.data) > 0) or (
            name == "last" and self._last is not None)


def _field_at(raw: bytes, pos: int, tag: int) -> tuple[int, int]:
    """``(start, end)`` of the length-delimited field ``tag`` at ``raw[pos]``; ``(pos, pos)`` if another
    field (or nothing) is there; ``(-1, -1)`` if it is cut off."""
    if pos >= len(raw) or raw[pos] != tag:
        return pos, pos
    n, start = _read_varint(raw, pos + 1, len(raw))
    return (start, start + n) if n >= 0 and start + n <= len(raw) else (-1, -1)


def _decode_fields(raw: bytes, pos: int, data_tag: int):
    """``(data view, GetEnd or None)`` of ``[data_tag field] [last]`` from ``pos`` to the end of ``raw``;
    ``None`` if anything else is there."""
    a, b = _field_at(raw, pos, data_tag)
    if a < 0:
        return None
    c, d = _field_at(raw, b, _TAG_F5_LEN)
    if c < 0 or d != len(raw):
        return None
    return memoryview(raw)[a:b], (pb.GetEnd.FromString(raw[c:d]) if c != b else None)


def decode_get_response(raw: bytes) -> pb.GetResponse | DataFrame:
    """Response deserializer of Get: a :class:`DataFrame` for a message of ``data`` (and ``last``), a
    :class:`HeaderFrame` for one of ``header`` (and ``header_data``, ``last``), else
    ``GetResponse.FromString(raw)``.

    :raises google.protobuf.message.DecodeError: for bytes that are no ``GetResponse``.
    """
    if len(raw) >= 2 and raw[0] == _TAG_F2_LEN:
        n, pos = _read_varint(raw, 1, len(raw))
        if n >= 0 and pos + n == len(raw):
            return DataFrame(memoryview(raw)[pos:])
        got = _decode_fields(raw, 0, _TAG_F2_LEN) if n >= 0 else None
        if got is not None:
            return DataFrame(*got)
    elif len(raw) >= 2 and raw[0] == _TAG_F1_LEN:
        a, b = _field_at(raw, 0, _TAG_F1_LEN)
        got = _decode_fields(raw, b, _TAG_F4_LEN) if 0 <= a and b < len(raw) else None
        if got is not None:  # (a header alone, the older form, is left to protobuf)
            return HeaderFrame(pb.BlockHeader.FromString(raw[a:b]), *got)
    return pb.GetResponse.FromString(raw)


def get_block_messages(header: pb.BlockHeader, raw: memoryview, chunk: int, *, inline: bool,
                       last: pb.GetEnd | None = None) -> Iterator[pb.GetResponse | bytes]:
    """The messages of one block of a Get stream: its header, then its bytes ``raw`` in ``chunk``-byte
    ``data`` messages (encoded already, one copy of the bytes).

    :param inline: the caller set ``inline_data``: the first chunk goes in the header's message, and
        ``last`` (the stream's ``GetEnd``, when this is its last block) in the block's last message.
    """
    n = len(raw)
    if not inline:
        yield pb.GetResponse(header=header)
        for off in range(0, n, chunk):
            yield encode_get_data(raw[off:off + chunk])
        return
    yield encode_get_block(header, raw[:chunk], last if n <= chunk else None)
    for off in range(chunk, n, chunk):
        yield encode_get_data(raw[off:off + chunk], last if off + chunk >= n else None)


# -- Put ---------------------------------------------------------------------------------------------
def encode_put_chunk(block_index: int, offset: int, data, checksum: int = 0) -> bytes:
    """``PutRequest(chunk=BlockChunk(...)).SerializeToString()``, in one copy of ``data``.

    :param data: the chunk's bytes (any bytes-like; a ``memoryview`` slice of the block is not copied
        before this).
    :raises ValueError: if ``block_index`` is not a uint32 or ``offset``/``checksum`` not a uint64.
    """
    return b"".join(_chunk(_TAG_F2_LEN, block_index, offset, data, checksum))


def encode_put_first(header: pb.PutHeader, data, checksum: int = 0) -> bytes:
    """``PutRequest(header=header, first_chunk=BlockChunk(header.first_block, 0, data, checksum))``
    serialised, in one copy of ``data`` (the one-message form of a small Put's start).

    :raises ValueError: if ``checksum`` is not a uint64.
    """
    return b"".join((*_message(_TAG_F1_LEN, header), *_chunk(_TAG_F3_LEN, header.first_block, 0, data, checksum)))


def _chunk(tag: int, block_index: int, offset: int, data, checksum: int) -> tuple:
    """The parts of a ``BlockChunk`` field ``tag``. :raises ValueError: for a field out of range."""
    if not (0 <= block_index < _U32 and 0 <= offset < _U64 and 0 <= checksum < _U64):
        raise ValueError(f"BlockChunk field out of range: block_index={block_index} offset={offset} "
                         f"checksum={checksum}")
    size = len(data)
    head = b"".join((b"\x08" + varint(block_index) if block_index else _EMPTY,
                     b"\x10" + varint(offset) if offset else _EMPTY,
                     b"\x1a" + varint(size) if size else _EMPTY))
    tail = b"\x20" + varint(checksum) if checksum else _EMPTY
    return bytes((tag,)), varint(len(head) + size + len(tail)), head, data, tail


def serialize_put_request(msg: pb.PutRequest | bytes) -> bytes:
    """Request serializer of Put: ``bytes`` are an encoded ``PutRequest`` already and go as they are."""
    return msg if type(msg) is bytes else msg.SerializeToString()


class ChunkFrame:
    """A ``PutRequest`` whose one field is ``chunk``, as :func:`decode_put_request` returns it.

    Answers ``WhichOneof("msg")`` with ``"chunk"``; ``chunk`` is the frame itself, with the
    ``BlockChunk`` fields ``block_index``, ``offset``, ``data`` (a ``memoryview`` of the received
    bytes, no copy) and ``checksum``.
    """

    __slots__ = ("block_index", "offset", "data", "checksum")

    def __init__(self, block_index: int, offset: int, data: memoryview | bytes, checksum: int) -> None:
        self.block_index = block_index
        self.offset = offset
        self.data = data
        self.checksum = checksum

    @property
    def chunk(self) -> "ChunkFrame":
        return self

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 (the protobuf method's name)
        return "chunk" if group == "msg" else None


class PutHeaderFrame:
    """A ``PutRequest`` of ``header`` and ``first_chunk``, as :func:`decode_put_request` returns it:
    ``header`` parsed by protobuf, ``first_chunk`` a :class:`ChunkFrame` (its data not copied)."""

    __slots__ = ("header", "first_chunk")

    def __init__(self, header: pb.PutHeader, first_chunk: ChunkFrame) -> None:
        self.header = header
        self.first_chunk = first_chunk

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 (the protobuf method's name)
        return "header" if group == "msg" else None

    def HasField(self, name: str) -> bool:  # noqa: N802
        return name in ("header", "first_chunk", "msg")


def _parse_chunk(raw: bytes, tag: int = _TAG_F2_LEN, start: int = 0) -> ChunkFrame | None:
    """The chunk of ``raw`` when it is a ``BlockChunk`` field ``tag`` at ``start`` running to the end
    of ``raw``, with BlockChunk's fields at most once each, in field order, values in range; ``None``
    for anything else (protobuf decides then)."""
    end = len(raw)
    if end < start + 2 or raw[start] != tag:
        return None
    n, pos = _read_varint(raw, start + 1, end)
    if n < 0 or pos + n != end:
        return None
    index = offset = checksum = 0
    data: memoryview | bytes = _EMPTY
    last = 0  # tag of the previous field: each may come once, in increasing order
    while pos < end:
        tag = raw[pos]
        if tag <= last or tag not in (_TAG_INDEX, _TAG_OFFSET, _TAG_DATA, _TAG_CHECKSUM):
            return None
        last = tag
        value, pos = _read_varint(raw, pos + 1, end)
        if value < 0:
            return None
        if tag == _TAG_DATA:
            if pos + value > end:
                return None
            data = memoryview(raw)[pos:pos + value]
            pos += value
        elif tag == _TAG_INDEX:
            if value >= _U32:
                return None  # protobuf truncates an oversized uint32: let it
            index = value
        elif value >= _U64:
            return None
        elif tag == _TAG_OFFSET:
            offset = value
        else:
            checksum = value
    return ChunkFrame(index, offset, data, checksum)


def decode_put_request(raw: bytes) -> pb.PutRequest | ChunkFrame | PutHeaderFrame:
    """Request deserializer of Put: a :class:`ChunkFrame` for a plain chunk message, a
    :class:`PutHeaderFrame` for a header with its first chunk, else ``PutRequest.FromString(raw)``.

    :raises google.protobuf.message.DecodeError: for bytes that are no ``PutRequest``.
    """
    frame = _parse_chunk(raw)
    if frame is not None:
        return frame
    if len(raw) >= 2 and raw[0] == _TAG_F1_LEN:
        a, b = _field_at(raw, 0, _TAG_F1_LEN)
        first = _parse_chunk(raw, _TAG_F3_LEN, b) if a >= 0 else None
        if first is not None:
            return PutHeaderFrame(pb.PutHeader.FromString(raw[a:b]), first)
    return pb.PutRequest.FromString(raw)


# -- wiring ------------------------------------------------------------------------------------------
#: Full method names of the two streaming RPCs.
GET_METHOD = "/kvtier.v1.KVCache/Get"
PUT_METHOD = "/kvtier.v1.KVCache/Put"


class FastKVCacheStub(pb_grpc.KVCacheStub):
    """``KVCacheStub`` (sync or ``grpc.aio`` channel) whose Get yields :class:`DataFrame` for payload
    messages and whose Put also sends pre-encoded ``bytes`` (:func:`encode_put_chunk`)."""

    def __init__(self, channel) -> None:
        super().__init__(channel)
        self.Get = channel.unary_stream(GET_METHOD, request_serializer=pb.GetRequest.SerializeToString,
                                        response_deserializer=decode_get_response, _registered_method=True)
        self.Put = channel.stream_unary(PUT_METHOD, request_serializer=serialize_put_request,
                                        response_deserializer=pb.PutResponse.FromString, _registered_method=True)


def fast_handlers(servicer: pb_grpc.KVCacheServicer) -> dict[str, grpc.RpcMethodHandler]:
    """Get and Put of ``servicer`` with the fast codecs, keyed by method name.

    Register them after ``add_KVCacheServicer_to_server`` with
    ``server.add_registered_method_handlers("kvtier.v1.KVCache", fast_handlers(servicer))``: the
    later registration replaces the generated handlers of these two methods (``grpc.aio`` looks
    registered methods up first and keeps the last handler given for a name).
    """
    return {
        "Get": grpc.unary_stream_rpc_method_handler(servicer.Get, request_deserializer=pb.GetRequest.FromString,
                                                    response_serializer=serialize_get_response),
        "Put": grpc.stream_unary_rpc_method_handler(servicer.Put, request_deserializer=decode_put_request,
                                                    response_serializer=pb.PutResponse.SerializeToString),
    }
