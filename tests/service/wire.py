"""Raw-wire helpers for service tests: build Put streams and read Get streams with the bare stubs.

Deliberately independent of ``service/client.py``: these tests pin the wire contract itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import grpc
import numpy as np
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from kvtier.service._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.tiering.codec import checksum

CHUNK = 1 << 20
NP_DTYPES = {"float32": np.float32, "float16": np.float16, "uint8": np.uint8, "int8": np.int8,
             "bfloat16": np.uint16}  # bfloat16: random 16-bit patterns are as good as any


def stub(target: str) -> tuple[grpc.Channel, pb_grpc.KVCacheStub]:
    channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 16 << 20),
                                                     ("grpc.max_send_message_length", 64 << 20)])
    return channel, pb_grpc.KVCacheStub(channel)


def namespace(dtype: str = "float16", layers: int = 4, kv_heads: int = 2, head_dim: int = 64,
              block_tokens: int = 16, model: str = "test/model", tenant: str = "") -> pb.Namespace:
    return pb.Namespace(model=model, revision="r1", tenant=tenant,
                        layout=pb.BlockLayout(dtype=dtype, layers=layers, kv_heads=kv_heads, head_dim=head_dim,
                                              block_tokens=block_tokens))


def block_bytes(ns: pb.Namespace, tokens: int) -> int:
    lay = ns.layout
    item = {"float32": 4, "float16": 2, "bfloat16": 2}.get(lay.dtype, 1)
    return 2 * lay.layers * lay.kv_heads * tokens * lay.head_dim * item


def random_blocks(ns: pb.Namespace, n_tokens: int, seed: int = 0) -> list[bytes]:
    """Random payloads for every block of ``n_tokens`` tokens (the last one partial if need be)."""
    rng = np.random.default_rng(seed)
    bt = ns.layout.block_tokens
    out = []
    for i in range(math.ceil(n_tokens / bt)):
        size = block_bytes(ns, min(bt, n_tokens - i * bt))
        out.append(rng.integers(0, 256, size, dtype=np.uint8).tobytes())
    return out


def tokens(n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed + 1000).integers(0, 50_000, n).tolist()


def put_stream(header: pb.PutHeader, payloads: list[bytes], *, with_checksums: bool = True, chunk: int = CHUNK):
    """The messages of a well-formed Put: header, then each block's chunks (checksum on the last)."""
    yield pb.PutRequest(header=header)
    for i, data in enumerate(payloads):
        index = header.first_block + i
        for off in range(0, len(data), chunk):
            last = off + chunk >= len(data)
            yield pb.PutRequest(chunk=pb.BlockChunk(block_index=index, offset=off, data=data[off:off + chunk],
                                                    checksum=checksum(data) if last and with_checksums else 0))


@dataclass
class GetResult:
    headers: list[pb.BlockHeader] = field(default_factory=list)
    blocks: list[bytes] = field(default_factory=list)
    end: pb.GetEnd | None = None


def collect_get(responses) -> GetResult:
    """Reassemble a Get stream, checking sizes, order and every block's checksum."""
    out = GetResult()
    buf = bytearray()
    for msg in responses:
        kind = msg.WhichOneof("msg")
        if kind == "header":
            assert not out.headers or len(buf) == out.headers[-1].size
            if out.headers:
                out.blocks.append(bytes(buf))
            out.headers.append(msg.header)
            buf = bytearray()
        elif kind == "data":
            assert 0 < len(msg.data) <= CHUNK
            buf += msg.data
        else:
            out.end = msg.end
    if out.headers:
        out.blocks.append(bytes(buf))
    for h, data in zip(out.headers, out.blocks):
        assert len(data) == h.size
        assert checksum(data) == h.checksum, f"block {h.index} fails its checksum"
    assert out.end is not None, "Get stream without GetEnd"
    return out


def details(err: grpc.RpcError) -> list:
    """The decoded ``google.rpc`` details of an error (BadRequest, QuotaFailure...)."""
    status = rpc_status.from_call(err)
    if status is None:
        return []
    out = []
    for any_msg in status.details:
        for cls in (error_details_pb2.BadRequest, error_details_pb2.QuotaFailure):
            if any_msg.Is(cls.DESCRIPTOR):
                msg = cls()
                any_msg.Unpack(msg)
                out.append(msg)
    return out
