"""The Python clients against a real ``kvtier serve`` process (and the in-process adapter).

Round trips in every float dtype with blocks over the 1 MiB chunk size, the asyncio client, the
checksum path (a flipped byte raises DATA_LOSS and returns nothing), and error codes with details.
"""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.blockwire import CHUNK_BYTES, GetAssembler, decode_block
from kvtier.service.client.client import AsyncKVTierClient, KVTierClient
from kvtier.service.client.types import TORCH_DTYPES, KVTierClientError
from kvtier.service.client.local import LocalKVTierClient
from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from tests.fixtures.server import KVTierProcess
from kvtier.tiering.codec import checksum

FLOAT_DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]


def ns_for(dtype: str, *, layers: int | None = None, model: str = "test/client") -> Namespace:
    item = TORCH_DTYPES[dtype].itemsize
    # ~1.5 MiB per full block whatever the dtype: every full block spans two chunks
    layers = layers or (3 << 19) // (2 * 4 * 16 * 128 * item)
    return Namespace("default", model, "r1", BlockLayout(dtype, layers, 4, 128, 16))


def make_blocks(ns: Namespace, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lay = ns.layout
    out = []
    for s in range(0, n_tokens, lay.block_tokens):
        t = min(lay.block_tokens, n_tokens - s)
        out.append(torch.randn(lay.shape(t), generator=gen).to(TORCH_DTYPES[lay.dtype]))
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8), b.view(torch.uint8))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """One server for the module (starting one costs seconds); tests use distinct sessions and namespaces."""
    proc = KVTierProcess(tmp_path_factory.mktemp("client-srv")).start()
    yield proc
    proc.kill()


@pytest.fixture
def kv(server):
    # the gRPC streams; the same-host shared-memory path has tests/service/server/test_shm.py
    with KVTierClient(server.target, timeout=30, data_path="grpc") as client:
        client.wait_ready(10)
        yield client


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_round_trip_byte_exact(kv, dtype):
    ns = ns_for(dtype)
    tokens = list(range(100, 140))  # 2 full blocks + a partial one of 8 tokens
    blocks = make_blocks(ns, len(tokens))
    assert ns.layout.block_bytes() > CHUNK_BYTES
    put = kv.put(ns, tokens, blocks, session_id=f"s-{dtype}")
    assert len(put.keys) == 3 and put.stored == put.keys
    found = kv.lookup(ns, tokens)
    assert (found.cached_blocks, found.cached_tokens) == (3, 40) and found.keys == put.keys
    for got in (kv.get(put.keys), kv.get(session_id=f"s-{dtype}")):
        assert got.complete and got.stopped_at is None and got.tokens == 40 and got.keys == put.keys
        assert all(t in ("hot", "warm", "cold") for t in got.tiers)
        assert all(same_bits(a, b) for a, b in zip(got.blocks, blocks)) and len(got.blocks) == 3


def test_incremental_put_lookup_resume_prefetch_delete(kv):
    ns = ns_for("float16", layers=2)
    tokens = list(range(64))
    blocks = make_blocks(ns, 64, seed=1)
    kv.put(ns, tokens[:32], blocks[:2], session_id="conv")
    grown = tokens + [7, 8, 9]
    found = kv.lookup(ns, grown)
    assert found.cached_blocks == 2 and len(found.keys) == 5
    extra = make_blocks(ns, len(grown), seed=1)[2:]
    put = kv.put(ns, grown, extra, first_block=found.cached_blocks, session_id="conv", durable=True)
    assert len(put.stored) == 3 and not put.skipped_present
    info = kv.resume("conv")
    assert info.namespace == ns and info.tokens == 67 and info.cached_blocks == 5 and info.keys == put.keys
    assert kv.prefetch(session_id="conv", wait=True).blocks == 5
    part = kv.get(session_id="conv", start_block=1, max_blocks=2)
    assert not part.complete and part.reason == "max_blocks" and part.stopped_at == 3 and part.tokens == 32
    assert same_bits(part.blocks[0], blocks[1])
    stats = kv.stats()
    assert stats.tiers and stats.version and stats.counters.get("puts", 0) >= 2
    assert kv.delete_session("conv", erase_blocks=True) >= 5
    assert kv.lookup(ns, grown).cached_blocks == 0
    with pytest.raises(KVTierClientError) as err:
        kv.resume("conv")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_invalidate_a_model(kv):
    ns = ns_for("bfloat16", layers=2, model="test/invalidate")
    kv.put(ns, list(range(32)), make_blocks(ns, 32))
    assert kv.invalidate(model="test/invalidate") >= 2
    assert kv.lookup(ns, list(range(32))).cached_blocks == 0


def test_async_client(server):
    ns = ns_for("float32", layers=4)
    tokens = list(range(50))
    blocks = make_blocks(ns, 50, seed=3)

    async def run():
        async with AsyncKVTierClient(server.target, timeout=30) as kv:
            await kv.wait_ready(10)
            put = await kv.put(ns, tokens, blocks, session_id="async")
            found = await kv.lookup(ns, tokens)
            got = await kv.get(session_id="async")
            info = await kv.resume("async")
            with pytest.raises(KVTierClientError) as err:
                await kv.get(session_id="nope")
            return put, found, got, info, err.value

    put, found, got, info, err = asyncio.run(run())
    assert found.cached_blocks == 4 and got.complete and got.keys == put.keys and info.tokens == 50
    assert all(same_bits(a, b) for a, b in zip(got.blocks, blocks))
    assert err.code == grpc.StatusCode.NOT_FOUND


def test_tampered_block_raises_data_loss(kv):
    ns = ns_for("float16", layers=2, model="test/tamper")
    tokens = list(range(16))
    put = kv.put(ns, tokens, make_blocks(ns, 16))
    real_get = kv._stub.Get

    class Tampered:
        def __init__(self, call):
            self.call, self.cancelled = call, False

        def __iter__(self):
            for msg in self.call:
                if msg.WhichOneof("msg") == "data":
                    msg.data = bytes([msg.data[0] ^ 0x01]) + msg.data[1:]
                elif msg.WhichOneof("msg") == "header" and len(msg.header_data):  # the one-message form
                    msg.header_data = bytes([msg.header_data[0] ^ 0x01]) + msg.header_data[1:]
                yield msg

        def cancel(self):
            self.cancelled = True
            self.call.cancel()

    made = []
    kv._stub.Get = lambda req, **kw: made.append(Tampered(real_get(req, **kw))) or made[-1]
    with pytest.raises(KVTierClientError) as err:
        kv.get(put.keys)
    assert err.value.code == grpc.StatusCode.DATA_LOSS and "checksum" in err.value.details
    assert made[0].cancelled


def test_decode_block_verifies_before_use():
    data = bytearray(torch.arange(2 * 1 * 1 * 4 * 2, dtype=torch.float32).numpy().tobytes())
    header = pb.BlockHeader(index=0, key=b"k" * 16, dtype="float32", shape=[2, 1, 1, 4, 2], checksum=checksum(data),
                            size=len(data))
    assert decode_block(header, data).shape == (2, 1, 1, 4, 2)
    bad = bytearray(data)
    bad[5] ^= 0x80
    with pytest.raises(KVTierClientError) as err:
        decode_block(header, bad)
    assert err.value.code == grpc.StatusCode.DATA_LOSS
    with pytest.raises(KVTierClientError):
        decode_block(header, data[:-4])
    asm = GetAssembler()  # a stream cut inside a block is an error, not a short result
    asm.feed(pb.GetResponse(header=header))
    asm.feed(pb.GetResponse(data=bytes(data[:8])))
    with pytest.raises(KVTierClientError) as err:
        asm.result()
    assert err.value.code == grpc.StatusCode.INTERNAL


def test_errors_carry_codes_and_details(kv):
    ns = ns_for("float16", layers=2)
    with pytest.raises(KVTierClientError) as err:  # refused locally: dtype differs from the layout
        kv.put(ns, list(range(16)), [torch.zeros(ns.layout.shape(16), dtype=torch.float32)])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(KVTierClientError) as err:  # refused by the server: 10 bytes are not a block
        kv.put(ns, list(range(16)), [b"0123456789"])
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.status is not None
    assert err.value.field_violations, err.value.error_details
    with pytest.raises(KVTierClientError) as err:
        kv.get(session_id="missing")
    assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_unreachable_server():
    with KVTierClient("127.0.0.1:1", timeout=2) as kv:
        with pytest.raises(KVTierClientError) as err:
            kv.stats()
        assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        with pytest.raises(KVTierClientError) as err:
            kv.wait_ready(0.5)
        assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED


def test_local_client_matches_the_grpc_one(tmp_path):
    store = TieredStore(StoreConfig(data_dir=str(tmp_path / "d"), hot_device="off", warm_capacity=64 << 20))
    with LocalKVTierClient(store, own_store=True) as kv:
        ns = ns_for("bfloat16", layers=2)
        blocks = make_blocks(ns, 40)
        put = kv.put(ns, list(range(40)), blocks, session_id="s")
        assert kv.lookup(ns, list(range(40))).cached_tokens == 40
        got = kv.get(session_id="s")
        assert got.complete and got.keys == put.keys and all(same_bits(a, b) for a, b in zip(got.blocks, blocks))
        assert kv.resume("s").namespace == ns
        with pytest.raises(KVTierClientError) as err:
            kv.resume("other")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


# -- issue 14 item 6: session calls act for the namespace's tenant; a Get result is its blocks ------------
def test_session_calls_default_to_the_tenant_the_session_was_put_under(server):
    ns = Namespace("acme", "test/tenant", "r1", BlockLayout("float16", 2, 2, 32, 16))
    blocks = make_blocks(ns, 40, seed=7)
    with KVTierClient(server.target, timeout=30, data_path="grpc") as kv:
        put = kv.put(ns, list(range(40)), blocks, session_id="conv-1")
        got = kv.get(session_id="conv-1")  # not NOT_FOUND under "default"
        assert got.complete and len(got) == 3 and all(same_bits(a, b) for a, b in zip(got, blocks))
        assert same_bits(got[0], blocks[0]) and list(got) == got.blocks and got.keys == put.keys
        assert kv.resume("conv-1").namespace == ns
        assert kv.prefetch(session_id="conv-1", wait=True).blocks == 3
    with KVTierClient(server.target, timeout=30, data_path="grpc") as other:  # never put it: names it
        with pytest.raises(KVTierClientError) as err:
            other.get(session_id="conv-1")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert len(other.get(session_id="conv-1", namespace=ns)) == 3
        assert len(other.get(put.keys, namespace=ns)) == 3 and len(other.get(put.keys)) == 0
        assert other.resume("conv-1", tenant="acme").tokens == 40
    with KVTierClient(server.target, timeout=30, data_path="grpc") as kv:
        kv.put(ns, list(range(40)), blocks, session_id="conv-2")
        assert kv.delete_session("conv-2") == 0
        with pytest.raises(KVTierClientError) as err:
            kv.resume("conv-2", namespace=ns)
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_async_and_local_clients_follow_the_same_tenant_rule(server, tmp_path):
    ns = Namespace("acme", "test/tenant-async", "r1", BlockLayout("bfloat16", 2, 2, 32, 16))
    blocks = make_blocks(ns, 20, seed=8)

    async def run():
        async with AsyncKVTierClient(server.target, timeout=30, data_path="grpc") as kv:
            await kv.put(ns, list(range(20)), blocks, session_id="conv-a")
            got = await kv.get(session_id="conv-a")
            return got, await kv.resume("conv-a"), await kv.delete_session("conv-a")

    got, info, _ = asyncio.run(run())
    assert len(got) == 2 and info.namespace == ns
    store = TieredStore(StoreConfig(data_dir=str(tmp_path / "d"), hot_device="off", warm_capacity=64 << 20))
    with LocalKVTierClient(store, own_store=True) as kv:
        kv.put(ns, list(range(20)), blocks, session_id="conv-l")
        assert len(kv.get(session_id="conv-l")) == 2 and kv.resume("conv-l").namespace == ns
        assert kv.delete_session("conv-l") == 0
        with pytest.raises(KVTierClientError) as err:
            kv.get(session_id="conv-l", namespace=ns)
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_local_client_maps_engine_errors_like_a_server(tmp_path):
    store = TieredStore(StoreConfig(data_dir=str(tmp_path / "d"), hot_device="off", warm_capacity=64 << 20))
    with LocalKVTierClient(store, own_store=True) as kv:
        ns = ns_for("float16", layers=2)
        with pytest.raises(KVTierClientError) as err:  # 10 bytes are not a block
            kv.put(ns, list(range(16)), [b"0123456789"])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT and err.value.field_violations
        assert isinstance(err.value.__cause__, Exception)
        with pytest.raises(KVTierClientError) as err:
            kv.delete_session("nope")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
