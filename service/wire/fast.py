"""Fast codecs for the payload messages of Get and Put: protobuf's exact bytes, without protobuf.

A Get streams ``GetResponse{data}`` messages and a Put ``PutRequest{chunk}`` messages of up to 1 MiB
each; going through protobuf costs a message build, a serialisation and a parse per chunk, each a
full copy of the payload (measured: half of the server's time in a Get). The wire format does not
change: these functions write and read exactly the bytes protobuf would, so any standard gRPC client
or server of ``kvtier.v1`` interoperates (``tests/service/wire/test_wire_fast.py`` checks every encoding
against ``SerializeToString`` and every decoding against ``FromString``).

Encodings (proto3, fields in field-number order, zero scalars omitted, as protobuf emits them)::

    GetResponse{data=P}                 0x12 varint(len P) P
    PutRequest{chunk=BlockChunk{i,o,P,c}}  0x12 varint(len C) C,  C = [0x08 varint(i)] [0x10 varint(o)]
                                                                 [0x1a varint(len P) P] [0x20 varint(c)]

Primitives:

* :func:`encode_get_data` / :func:`encode_put_chunk`: a payload chunk as its message's encoding, in
  one copy of the payload (the copy ``bytes(view[a:b])`` made before);
* :func:`serialize_get_response` / :func:`serialize_put_request`: serializers that send such ``bytes``
  as they are and any message object through ``SerializeToString``;
* :func:`decode_get_response` / :func:`decode_put_request`: deserializers that recognise a payload
  message by its bytes and return a :class:`DataFrame` / :class:`ChunkFrame` (a message-shaped view
  of the payload, no copy), and parse every other message with ``FromString`` (so anything that
  does not match, e.g. unknown fields or an unusual field order, still parses exactly as protobuf
  would, errors included);
* :class:`FastKVCacheStub` (client) and :func:`fast_handlers` (server): Get and Put with these codecs.

Thread-safe: everything here is a pure function or an immutable value.
"""

from __future__ import annotations

import grpc

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc

#: Key of field 2, wire type 2 (length-delimited): ``GetResponse.data`` and ``PutRequest.chunk``.
_TAG_F2_LEN = 0x12
_TAG_INDEX, _TAG_OFFSET, _TAG_DATA, _TAG_CHECKSUM = 0x08, 0x10, 0x1A, 0x20
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
def encode_get_data(payload) -> bytes:
    """``GetResponse(data=payload).SerializeToString()``, in one copy of ``payload`` (any bytes-like)."""
    return b"".join((b"\x12", varint(len(payload)), payload))


def serialize_get_response(msg: pb.GetResponse | bytes) -> bytes:
    """Response serializer of Get: ``bytes`` are an encoded ``GetResponse`` already and go as they are."""
    return msg if type(msg) is bytes else msg.SerializeToString()


class DataFrame:
    """A ``GetResponse`` whose one field is ``data``, as :func:`decode_get_response` returns it.

    It answers the part of the message API that readers of a Get stream use: ``WhichOneof("msg")``
    is ``"data"``, and ``data`` is the payload as a ``memoryview`` of the received bytes (no copy;
    assignable, like the message's field).
    """

    __slots__ = ("data",)

    def __init__(self, data: memoryview | bytes) -> None:
        self.data = data

    def WhichOneof(self, group: str) -> str | None:  # noqa: N802 (the protobuf method's name)
        return "data" if group == "msg" else None

    def HasField(self, name: str) -> bool:  # noqa: N802
        return name in ("data", "msg")


def decode_get_response(raw: bytes) -> pb.GetResponse | DataFrame:
    """Response deserializer of Get: a :class:`DataFrame` for a message that is only ``data``, else
    ``GetResponse.FromString(raw)``.

    :raises google.protobuf.message.DecodeError: for bytes that are no ``GetResponse``.
    """
    if len(raw) >= 2 and raw[0] == _TAG_F2_LEN:
        n, pos = _read_varint(raw, 1, len(raw))
        if n >= 0 and pos + n == len(raw):
            return DataFrame(memoryview(raw)[pos:])
    return pb.GetResponse.FromString(raw)


# -- Put ---------------------------------------------------------------------------------------------
def encode_put_chunk(block_index: int, offset: int, data, checksum: int = 0) -> bytes:
    """``PutRequest(chunk=BlockChunk(...)).SerializeToString()``, in one copy of ``data``.

    :param data: the chunk's bytes (any bytes-like; a ``memoryview`` slice of the block is not copied
        before this).
    :raises ValueError: if ``block_index`` is not a uint32 or ``offset``/``checksum`` not a uint64.
    """
    if not (0 <= block_index < _U32 and 0 <= offset < _U64 and 0 <= checksum < _U64):
        raise ValueError(f"BlockChunk field out of range: block_index={block_index} offset={offset} "
                         f"checksum={checksum}")
    size = len(data)
    head = b"".join((b"\x08" + varint(block_index) if block_index else _EMPTY,
                     b"\x10" + varint(offset) if offset else _EMPTY,
                     b"\x1a" + varint(size) if size else _EMPTY))
    tail = b"\x20" + varint(checksum) if checksum else _EMPTY
    return b"".join((b"\x12", varint(len(head) + size + len(tail)), head, data, tail))


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


def _parse_chunk(raw: bytes) -> ChunkFrame | None:
    """The chunk of ``raw`` when it is a ``PutRequest{chunk}`` with BlockChunk's fields at most once
    each, in field order, values in range; ``None`` for anything else (protobuf decides then)."""
    end = len(raw)
    if end < 2 or raw[0] != _TAG_F2_LEN:
        return None
    n, pos = _read_varint(raw, 1, end)
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


def decode_put_request(raw: bytes) -> pb.PutRequest | ChunkFrame:
    """Request deserializer of Put: a :class:`ChunkFrame` for a plain chunk message, else
    ``PutRequest.FromString(raw)``.

    :raises google.protobuf.message.DecodeError: for bytes that are no ``PutRequest``.
    """
    frame = _parse_chunk(raw)
    return frame if frame is not None else pb.PutRequest.FromString(raw)


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
