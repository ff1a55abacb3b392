"""One-message small Gets and Puts (``GetRequest.inline_data``, ``PutRequest.first_chunk``) against a real
server, and both directions of compatibility: a caller that sends or expects the separate messages (an
older client) is served exactly as before, and the client reads the separate form an older server sends."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from kvtier.service.client.blockwire import GetAssembler, put_requests
from kvtier.service.client.client import KVTierClient
from kvtier.service.client.core import ClientCore
from kvtier.service.client.steps import Unary
from kvtier.service.client.types import KVTierClientError
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire.fast import FastKVCacheStub, decode_get_response, decode_put_request
from kvtier.tiering import BlockLayout, Namespace
from kvtier.tiering.codec import checksum
from tests.fixtures.wire import CHUNK, collect_get, namespace, put_stream, random_blocks, stub, tokens

T = 30
SMALL = dict(dtype="float16", layers=4, kv_heads=2, head_dim=64, block_tokens=16)  # 32 KiB blocks
BIG = dict(dtype="bfloat16", layers=24, kv_heads=8, head_dim=128, block_tokens=16)  # 1.5 MiB: two chunks


def _one_message_put(kv, ns, toks, payloads):
    """A Put whose first chunk rides in the header's message (plain protobuf, as any client may send it)."""
    header = pb.PutHeader(namespace=ns, token_ids=toks, block_count=len(payloads))
    msgs = list(put_stream(header, payloads))
    first = pb.PutRequest(header=header, first_chunk=msgs[1].chunk)
    return kv.Put(iter([first, *msgs[2:]]), timeout=T)


def _three_blocks(kv, model: str, seed: int):
    """Three 32 KiB blocks put the usual way (separate messages); their payloads and keys."""
    ns = namespace(**SMALL, model=model)
    payloads = random_blocks(ns, 48, seed=seed)
    header = pb.PutHeader(namespace=ns, token_ids=tokens(48, seed=seed), block_count=3)
    return payloads, list(kv.Put(put_stream(header, payloads), timeout=T).keys)


def _raw_get(channel, request):
    """The Get stream's messages, each decoded by protobuf itself."""
    call = channel.unary_stream("/kvtier.v1.KVCache/Get", request_serializer=pb.GetRequest.SerializeToString,
                                response_deserializer=pb.GetResponse.FromString)
    return list(call(request, timeout=T))


@pytest.mark.parametrize("lay", [SMALL, BIG], ids=["small", "two-chunks"])
def test_one_message_put_and_inline_get_round_trip(shared_server, lay):
    channel, kv = stub(shared_server.target)
    with channel:
        ns = namespace(**lay, model=f"one-message/{lay['dtype']}")
        toks = tokens(16, seed=11)
        payloads = random_blocks(ns, 16, seed=11)
        resp = _one_message_put(kv, ns, toks, payloads)
        assert list(resp.stored) == list(resp.keys) and resp.accepts_first_chunk
        msgs = _raw_get(channel, pb.GetRequest(keys=pb.KeyList(keys=resp.keys), inline_data=True))
        # small: header + its bytes + the GetEnd in one message; two chunks: the GetEnd rides on the second
        assert len(msgs) == (1 if len(payloads[0]) <= CHUNK else 2)
        assert msgs[0].WhichOneof("msg") == "header" and msgs[0].header_data == payloads[0][:CHUNK]
        assert all(not m.HasField("last") for m in msgs[:-1]) and msgs[-1].last.complete
        assert msgs[-1].last.blocks_sent == 1 and msgs[-1].last.tokens == 16
        assert b"".join([msgs[0].header_data] + [m.data for m in msgs[1:]]) == payloads[0]
        asm = GetAssembler()
        for m in msgs:  # the client's own reader, fed the protobuf-decoded messages
            asm.feed(m)
        got = asm.result()
        assert got.complete and got.blocks[0].reshape(-1).view(torch.uint8).numpy().tobytes() == payloads[0]


def test_a_get_without_inline_data_is_served_as_before(shared_server):
    channel, kv = stub(shared_server.target)
    with channel:
        payloads, keys = _three_blocks(kv, "one-message/old-get", 12)
        msgs = _raw_get(channel, pb.GetRequest(keys=pb.KeyList(keys=keys)))
        assert [m.WhichOneof("msg") for m in msgs] == ["header", "data"] * 3 + ["end"]
        assert not any(m.header_data or m.HasField("last") for m in msgs)
        assert collect_get(iter(msgs)).blocks == payloads


def test_inline_get_cut_at_a_miss_carries_the_miss_in_its_last_message(shared_server):
    channel, kv = stub(shared_server.target)
    with channel:
        keys = _three_blocks(kv, "one-message/miss", 13)[1][:2] + [bytes(16)]  # the third is not held
        msgs = _raw_get(channel, pb.GetRequest(keys=pb.KeyList(keys=keys), inline_data=True))
        assert [m.WhichOneof("msg") for m in msgs] == ["header", "header"]
        assert not msgs[0].HasField("last") and msgs[1].HasField("last")
        end = msgs[1].last
        assert (end.reason, end.blocks_sent, end.stopped_at, end.complete) == ("miss", 2, 2, False)
        plain = _raw_get(channel, pb.GetRequest(keys=pb.KeyList(keys=keys)))  # the same answer, separate form
        assert plain[-1].end == end


def test_a_first_chunk_out_of_place_is_invalid_argument(shared_server):
    channel, kv = stub(shared_server.target)
    with channel:
        ns = namespace(**SMALL, model="one-message/bad")
        toks = tokens(16, seed=14)
        data = random_blocks(ns, 16, seed=14)[0]
        header = pb.PutHeader(namespace=ns, token_ids=toks, block_count=1)
        bad = pb.PutRequest(header=header, first_chunk=pb.BlockChunk(block_index=0, offset=8, data=data[8:]))
        with pytest.raises(grpc.RpcError) as err:
            kv.Put(iter([bad]), timeout=T)
        assert err.value.code() is grpc.StatusCode.INVALID_ARGUMENT and "offset" in err.value.details()


def test_the_client_learns_first_chunk_from_the_server_and_round_trips(shared_server):
    layout = BlockLayout("float16", 4, 2, 64, 16)
    ns = Namespace("default", "one-message/client", "r1", layout)
    with KVTierClient(shared_server.target, data_path="grpc", timeout=T) as client:
        core = client._core  # noqa: SLF001 - the one flag this test is about
        assert not core.put_first_chunk  # nothing said yet: the first Put sends the separate messages
        blocks = [np.random.default_rng(i).integers(0, 256, layout.block_bytes(), dtype=np.uint8) for i in range(2)]
        first = client.put(ns, list(range(16)), blocks[:1])
        assert core.put_first_chunk
        second = client.put(ns, list(range(100, 116)), blocks[1:])
        for put, data in ((first, blocks[0]), (second, blocks[1])):
            got = client.get(put.keys)
            assert got.complete and got.blocks[0].reshape(-1).view(torch.uint8).numpy().tobytes() == data.tobytes()


def test_a_refused_one_message_put_is_sent_again_the_long_way():
    """A server behind the address that no longer reads first_chunk (an older one) refuses the Put; the
    client sends it once more as separate messages and keeps to them (driven step by step, sans-IO)."""
    layout = BlockLayout("float16", 1, 1, 8, 4)
    core = ClientCore("127.0.0.1:1", timeout=5, tenant="default", data_path="grpc")
    core.put_first_chunk = True
    steps = core.put(Namespace("default", "m", "r1", layout), [1, 2, 3, 4], [bytes(layout.block_bytes())],
                     first_block=0, session_id=None, durable=False, priority=0, ttl_seconds=0, checksums=True,
                     timeout=None)
    step = next(steps)
    assert isinstance(step, Unary) and type(decode_put_request(next(iter(step.request)))).__name__ == "PutHeaderFrame"
    step = steps.throw(KVTierClientError(grpc.StatusCode.INVALID_ARGUMENT, "the header declared 1 blocks but 0 arrived"))
    msgs = list(step.request)
    assert isinstance(msgs[0], pb.PutRequest) and msgs[0].WhichOneof("msg") == "header" and len(msgs) == 2
    with pytest.raises(StopIteration):
        steps.send(pb.PutResponse(keys=[bytes(16)], stored=[bytes(16)]))
    assert not core.put_first_chunk


def test_the_assembler_reads_the_separate_form_of_an_older_server():
    data = bytes(range(256)) * 3
    header = pb.BlockHeader(index=0, key=bytes(16), dtype="float16", shape=[2, 1, 1, 3, 64], size=len(data),
                            checksum=checksum(data))
    asm = GetAssembler()
    for m in (pb.GetResponse(header=header), pb.GetResponse(data=data[:100]), pb.GetResponse(data=data[100:]),
              pb.GetResponse(end=pb.GetEnd(blocks_sent=1, complete=True, stopped_at=1, tokens=3))):
        asm.feed(decode_get_response(m.SerializeToString()))
    got = asm.result()
    assert got.complete and got.blocks[0].reshape(-1).view(torch.uint8).numpy().tobytes() == data
    with pytest.raises(KVTierClientError):  # nothing may follow the end
        asm.feed(pb.GetResponse(data=b"x"))


def test_put_requests_first_chunk_form_matches_protobuf():
    header = pb.PutHeader(token_ids=[1, 2], first_block=1, block_count=2)
    views = [memoryview(bytes([7]) * 5), memoryview(bytes([9]) * 3)]
    msgs = list(put_requests(header, views, first_chunk=True, chunk_bytes=4))
    want = pb.PutRequest(header=header, first_chunk=pb.BlockChunk(block_index=1, data=b"\x07" * 4))
    assert msgs[0] == want.SerializeToString() and len(msgs) == 3  # 4 bytes + 1 byte, then block 2 whole
    assert pb.PutRequest.FromString(msgs[1]).chunk.offset == 4
    assert pb.PutRequest.FromString(msgs[2]).chunk.checksum == checksum(b"\x09" * 3)
    assert list(put_requests(header, [], first_chunk=True)) == [pb.PutRequest(header=header)]
