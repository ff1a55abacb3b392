"""service/wire/fast.py: its encodings are protobuf's bytes, its decodings protobuf's values."""

from __future__ import annotations

import grpc
import pytest
from google.protobuf.message import DecodeError
from hypothesis import given, settings
from hypothesis import strategies as st

from kvtier.service.wire import fast as wf
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb

U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
# sizes around every varint length boundary of the payload and of the enclosing message
SIZES = st.one_of(st.integers(0, 300), st.sampled_from([127, 128, 16383, 16384, 16400, (1 << 20) - 1, 1 << 20]))


def payload(size: int, seed: int) -> bytes:
    return (bytes(range(seed, 256)) + bytes(range(seed))) * (size // 256) + bytes(range(size % 256))


@given(U64)
def test_varint_is_protobufs(n):
    assert wf.varint(n) == (pb.BlockChunk(offset=n).SerializeToString()[1:] if n else b"\x00")


@settings(max_examples=60, deadline=None)
@given(SIZES, st.integers(0, 255))
def test_get_data_encoding_round_trips(size, seed):
    data = payload(size, seed)
    raw = wf.encode_get_data(memoryview(data))
    assert raw == pb.GetResponse(data=data).SerializeToString()
    frame = wf.decode_get_response(raw)
    assert isinstance(frame, wf.DataFrame) and frame.WhichOneof("msg") == "data" and bytes(frame.data) == data


@settings(max_examples=200, deadline=None)
@given(U32, U64, SIZES, U64, st.integers(0, 255))
def test_put_chunk_encoding_round_trips(index, offset, size, checksum, seed):
    data = payload(size, seed)
    raw = wf.encode_put_chunk(index, offset, memoryview(data), checksum)
    expected = pb.PutRequest(chunk=pb.BlockChunk(block_index=index, offset=offset, data=data, checksum=checksum))
    assert raw == expected.SerializeToString()
    frame = wf.decode_put_request(raw)
    assert isinstance(frame, wf.ChunkFrame) and frame.WhichOneof("msg") == "chunk"
    c = frame.chunk
    assert (c.block_index, c.offset, bytes(c.data), c.checksum) == (index, offset, data, checksum)


@pytest.mark.parametrize("msg", [
    pb.GetResponse(header=pb.BlockHeader(index=3, key=b"k" * 16, dtype="float16", shape=[2, 1, 1, 16, 4], size=9)),
    pb.GetResponse(end=pb.GetEnd(blocks_sent=2, complete=True, tokens=32)),
    pb.GetResponse(end=pb.GetEnd()),
    pb.GetResponse(),
])
def test_other_get_messages_parse_as_protobuf(msg):
    raw = wf.serialize_get_response(msg)
    assert raw == msg.SerializeToString()
    assert wf.decode_get_response(raw) == msg


def test_put_header_parses_as_protobuf():
    msg = pb.PutRequest(header=pb.PutHeader(token_ids=[1, 2, 3], first_block=1, block_count=2, session_id="s"))
    assert wf.serialize_put_request(msg) == msg.SerializeToString()
    assert wf.decode_put_request(msg.SerializeToString()) == msg
    assert wf.serialize_put_request(b"\x12\x00") == b"\x12\x00"


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_any_bytes_decode_as_protobuf_would(raw):
    """Whatever the fast path accepts, protobuf reads the same; whatever protobuf refuses, so do we."""
    for decode, cls in ((wf.decode_get_response, pb.GetResponse), (wf.decode_put_request, pb.PutRequest)):
        try:
            want = cls.FromString(raw)
        except DecodeError:
            with pytest.raises(DecodeError):
                decode(raw)
            continue
        got = decode(raw)
        if isinstance(got, wf.DataFrame):
            assert want.WhichOneof("msg") == "data" and want.data == bytes(got.data)
        elif isinstance(got, wf.ChunkFrame):
            c = want.chunk
            assert want.WhichOneof("msg") == "chunk"
            assert (c.block_index, c.offset, c.data, c.checksum) == (got.block_index, got.offset, bytes(got.data),
                                                                     got.checksum)
        else:
            assert got == want


@pytest.mark.parametrize("raw", [
    b"\x12\x03\x1a\x01x\x08\x05",             # fields out of order: protobuf reads index 5
    b"\x12\x04\x08\x01\x08\x02",              # a field twice: the last wins
    b"\x12\x04\x08\x01\x28\x07",              # an unknown field (5)
    b"\x12\x0b\x08\xff\xff\xff\xff\x1f\x1a\x01x\x20\x01",  # block_index past uint32: protobuf truncates
])
def test_unusual_chunks_fall_back_to_protobuf(raw):
    want = pb.PutRequest.FromString(raw)
    got = wf.decode_put_request(raw)
    assert isinstance(got, pb.PutRequest) and got == want


def test_out_of_range_fields_are_refused():
    for args in ((2**32, 0), (0, 2**64), (-1, 0)):
        with pytest.raises(ValueError):
            wf.encode_put_chunk(*args, b"x")
    with pytest.raises(ValueError):
        wf.encode_put_chunk(0, 0, b"x", 2**64)


def test_fast_handlers_cover_get_and_put():
    class Servicer:
        async def Get(self, request, context):  # noqa: N802
            yield b""

        async def Put(self, request_iterator, context):  # noqa: N802
            return pb.PutResponse()

    handlers = wf.fast_handlers(Servicer())
    assert set(handlers) == {"Get", "Put"}
    assert handlers["Get"].response_serializer is wf.serialize_get_response
    assert handlers["Put"].request_deserializer is wf.decode_put_request
    assert isinstance(handlers["Get"], grpc.RpcMethodHandler)


# -- the one-message forms (GetRequest.inline_data, PutRequest.first_chunk) ---------------------------
_HEADER = pb.BlockHeader(index=2, key=b"k" * 16, dtype="float16", shape=[2, 1, 1, 3, 4], size=48, checksum=9)


@pytest.mark.parametrize("payload", [b"", b"x", bytes(range(256)) * 700])
@pytest.mark.parametrize("last", [None, pb.GetEnd(), pb.GetEnd(blocks_sent=3, complete=True, stopped_at=3, tokens=40)])
def test_one_message_get_forms_are_protobufs_bytes_and_decode_back(payload, last):
    want = pb.GetResponse(header=_HEADER, header_data=payload)
    if last is not None:
        want.last.CopyFrom(last)
    raw = wf.encode_get_block(_HEADER, payload, last)
    assert raw == want.SerializeToString()
    got = wf.decode_get_response(raw)
    assert got.WhichOneof("msg") == "header" and got.header == _HEADER and bytes(got.header_data) == payload
    assert got.HasField("last") == (last is not None) and (last is None or got.last == last)
    if payload:
        want = pb.GetResponse(data=payload)
        if last is not None:
            want.last.CopyFrom(last)
        raw = wf.encode_get_data(payload, last)
        assert raw == want.SerializeToString()
        got = wf.decode_get_response(raw)
        assert got.WhichOneof("msg") == "data" and bytes(got.data) == payload
        assert got.HasField("last") == (last is not None) and (last is None or got.last == last)


@pytest.mark.parametrize("payload,checksum", [(b"", 0), (b"abc", 0), (b"abc" * 1000, 2**64 - 1)])
def test_put_header_with_first_chunk_is_protobufs_bytes_and_decodes_back(payload, checksum):
    header = pb.PutHeader(token_ids=[5, 6, 7], first_block=4, block_count=1, durable=True)
    raw = wf.encode_put_first(header, payload, checksum)
    assert raw == pb.PutRequest(header=header, first_chunk=pb.BlockChunk(block_index=4, data=payload,
                                                                         checksum=checksum)).SerializeToString()
    got = wf.decode_put_request(raw)
    assert got.WhichOneof("msg") == "header" and got.header == header and got.HasField("first_chunk")
    chunk = got.first_chunk
    assert (chunk.block_index, chunk.offset, bytes(chunk.data), chunk.checksum) == (4, 0, payload, checksum)


def test_get_block_messages_in_both_forms():
    raw = memoryview(bytes(range(250)) * 10)
    end = pb.GetEnd(blocks_sent=1, complete=True, stopped_at=1)
    old = [pb.GetResponse.FromString(wf.serialize_get_response(m))
           for m in wf.get_block_messages(_HEADER, raw, 1000, inline=False)]
    assert [m.WhichOneof("msg") for m in old] == ["header", "data", "data", "data"]
    assert b"".join(m.data for m in old[1:]) == raw and not any(m.HasField("last") for m in old)
    new = [pb.GetResponse.FromString(m) for m in wf.get_block_messages(_HEADER, raw, 1000, inline=True, last=end)]
    assert [m.WhichOneof("msg") for m in new] == ["header", "data", "data"]
    assert new[0].header_data + b"".join(m.data for m in new[1:]) == raw
    assert [m.HasField("last") for m in new] == [False, False, True] and new[-1].last == end
    one = [pb.GetResponse.FromString(m) for m in wf.get_block_messages(_HEADER, raw[:10], 1000, inline=True, last=end)]
    assert len(one) == 1 and one[0].header_data == raw[:10] and one[0].last == end
