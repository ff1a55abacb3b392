"""get_kv / restore_cache into a layer-major KV destination, against a real server process (shared
memory and the Get stream) and the in-process client: bit-identical to concatenating the blocks (odd
token counts, a partial last block), the shared-memory destination lies in the client's arena, a
damaged block is DATA_LOSS and no cache, and a destination outside the arena or of another geometry is
INVALID_ARGUMENT naming the field."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch

from kvtier.service.client.client import AsyncKVTierClient, KVTierClient
from kvtier.service.client.local import LocalKVTierClient
from kvtier.service.client.requests import client_error
from kvtier.service.client.types import KVTierClientError
from kvtier.service.integrations import hf
from kvtier.service.integrations.presized import PresizedLayer
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering import TieredStore
from kvtier.tiering.config import StoreConfig
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout
from tests.fixtures.server import KVTierProcess
from tests.fixtures.records import flip_record as _flip

LAYOUT = BlockLayout("float32", layers=3, kv_heads=2, head_dim=8, block_tokens=16)


def _blocks(n_tokens: int, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    whole = torch.randn(LAYOUT.shape(n_tokens), generator=g)
    return [whole[:, :, :, s:s + 16].contiguous() for s in range(0, n_tokens, 16)]


def _ns(name: str) -> Namespace:
    return Namespace("default", name, "r1", LAYOUT)


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    proc = KVTierProcess(tmp_path_factory.mktemp("shm-kv")).start()
    yield proc
    proc.kill()


def _in_arena(kv: torch.Tensor, client: KVTierClient) -> bool:
    if client._shm is None:
        return False
    arena = client._shm.arena.tensor
    return arena.data_ptr() <= kv.data_ptr() < arena.data_ptr() + arena.numel()


@pytest.mark.parametrize("data_path", ["shm", "grpc"])
@pytest.mark.parametrize("n_tokens", [37, 48, 5])
def test_get_kv_is_the_concatenation(proc, data_path, n_tokens):
    ns, blocks = _ns(f"kv-{data_path}-{n_tokens}"), _blocks(n_tokens, n_tokens)
    ids = list(range(7, 7 + n_tokens))
    with KVTierClient(proc.target, data_path=data_path) as kv:
        keys = kv.put(ns, ids, blocks).keys
        got = kv.get_kv(keys, namespace=ns, capacity=n_tokens + 40)
        assert got.complete and got.tokens == n_tokens and got.keys == keys
        assert got.kv.shape == (2, 3, 2, n_tokens + 40, 8)
        assert torch.equal(got.kv[:, :, :, :n_tokens], torch.cat(blocks, dim=3))
        assert _in_arena(got.kv, kv) == (data_path == "shm")  # written by the server straight into the arena
        with pytest.raises(KVTierClientError) as err:
            kv.get_kv(keys, namespace=ns, capacity=len(keys) * 16 - 1)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


@pytest.mark.parametrize("data_path", ["shm", "grpc"])
def test_the_asyncio_client_gets_the_same_tensor(proc, data_path):
    ns, blocks = _ns(f"kv-async-{data_path}"), _blocks(21, 8)

    async def main():
        async with AsyncKVTierClient(proc.target, data_path=data_path) as kv:
            keys = (await kv.put(ns, list(range(21)), blocks)).keys
            return await kv.get_kv(keys, namespace=ns)

    got = asyncio.run(main())
    assert got.complete and got.tokens == 21 and torch.equal(got.kv[:, :, :, :21], torch.cat(blocks, dim=3))


@pytest.mark.parametrize("data_path", ["shm", "grpc"])
def test_restore_cache_views_the_destination_and_appends_in_place(proc, data_path):
    ns, blocks = _ns(f"restore-{data_path}"), _blocks(40, 3)
    ids = list(range(40))
    with KVTierClient(proc.target, data_path=data_path) as kv:
        kv.put(ns, ids, blocks, session_id=f"s-{data_path}")
        cache, n = hf.restore_cache(kv, f"s-{data_path}", ids + [1, 2], namespace=ns, room=4)
        assert n == 40
        full = torch.cat(blocks, dim=3)
        for i, layer in enumerate(cache.layers):
            assert isinstance(layer, PresizedLayer) and layer.capacity == 48  # 3 blocks; room 4 is less
            assert torch.equal(layer.keys[0], full[0, i]) and torch.equal(layer.values[0], full[1, i])
        layer = cache.layers[0]
        before = layer.keys.data_ptr()
        new = torch.ones(1, 2, 8, 8)
        keys, values = cache.update(new, new * 2, 0)  # the model's next forward appends 8 tokens
        assert keys.data_ptr() == before and keys.shape[2] == 48 and torch.equal(keys[:, :, 40:], new)
        keys, _ = cache.update(new[:, :, :1], new[:, :, :1], 0)  # past the capacity: moves, keeps every token
        assert keys.shape[2] == 49 and torch.equal(keys[0, :, :40], full[0, 0]) and layer.capacity > 49


def test_a_damaged_record_is_data_loss_and_no_cache(tmp_path):
    proc = KVTierProcess(tmp_path / "srv").start()
    ns, blocks = _ns("damaged"), _blocks(48, 4)
    ids = list(range(48))
    try:
        with KVTierClient(proc.target, data_path="shm") as kv:
            keys = kv.put(ns, ids, blocks, session_id="d", durable=True).keys
        proc.stop()
        _flip(str(proc.data_dir), keys[1], lambda n: n - 2)
        proc.start()  # every block is cold now
        with KVTierClient(proc.target, data_path="shm") as kv:
            with pytest.raises(KVTierClientError) as err:  # a lookup moves nothing: the Get meets the damage
                hf.restore_cache(kv, ns, ids + [1])
            assert err.value.code == grpc.StatusCode.DATA_LOSS
            # the record failed and was dropped: the next restore is the prefix before it (a resume's
            # prefetch would also have met the damage first, and made it a miss)
            cache, n = hf.restore_cache(kv, "d", ids + [1], namespace=ns)
            assert n == 16 and torch.equal(cache.layers[2].values[0], blocks[0][1, 2])
    finally:
        proc.kill()


def test_a_block_damaged_on_the_get_stream_is_data_loss(proc):
    ns, blocks = _ns("stream-flip"), _blocks(32, 5)
    with KVTierClient(proc.target, data_path="grpc") as kv:
        keys = kv.put(ns, list(range(32)), blocks).keys
        real = kv._stub.Get

        class Flipped:  # what a corrupted transfer would do: the last byte of every data message flipped
            def __init__(self, request, **kw):
                self.call = real(request, **kw)

            def __iter__(self):
                for msg in self.call:
                    if msg.WhichOneof("msg") == "data":
                        data = bytearray(msg.data)
                        data[-1] ^= 1
                        msg = pb.GetResponse(data=bytes(data))
                    yield msg

            def cancel(self):
                self.call.cancel()

        kv._stub.Get = Flipped
        with pytest.raises(KVTierClientError) as err:
            kv.get_kv(keys, namespace=ns)
        assert err.value.code == grpc.StatusCode.DATA_LOSS


def _raw_get_shm(kv: KVTierClient, ns: Namespace, keys, **destination) -> grpc.RpcError:
    link = kv._link(10)
    geometry = dict(offset=0, capacity_tokens=64, dtype="float32", layers=3, kv_heads=2, head_dim=8)
    req = pb.GetShmRequest(arena_id=link.arena_id, request=pb.GetRequest(
        keys=pb.KeyList(keys=[k.digest for k in keys]), tenant=ns.tenant),
        destination=pb.ShmKVDestination(**{**geometry, **destination}))
    with pytest.raises(grpc.RpcError) as err:
        kv._stub.GetShm(req, timeout=10)
    return err.value


@pytest.mark.parametrize("bad,field", [
    (dict(offset=1 << 40), "destination"), (dict(offset=100), "destination.offset"),
    (dict(capacity_tokens=1 << 22), "destination"), (dict(dtype="float64"), "destination.dtype"),
    (dict(layers=0), "destination.layers"), (dict(first_token=64), "destination.first_token"),
    (dict(layers=4), "destination"), (dict(head_dim=4), "destination"), (dict(dtype="float16"), "destination")])
def test_bad_destinations_are_invalid_argument(proc, bad, field):
    ns = _ns("hostile-dest")
    with KVTierClient(proc.target, data_path="shm") as kv:
        keys = kv.put(ns, list(range(32)), _blocks(32, 6)).keys
        err = _raw_get_shm(kv, ns, keys, **bad)
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert [f for f, _ in client_error(err).field_violations] == [field]


def test_local_client_scatters_and_reports_damage(tmp_path):
    cfg = dict(data_dir=str(tmp_path), hot_device="cpu", durable_sync=False)
    ns, blocks = _ns("local"), _blocks(37, 7)
    store = TieredStore(StoreConfig(**cfg))
    keys = store.put(ns, list(range(37)), blocks, durable=True).keys
    got = LocalKVTierClient(store).get_kv(keys, namespace=ns)
    assert got.complete and got.tokens == 37 and torch.equal(got.kv[:, :, :, :37], torch.cat(blocks, dim=3))
    store.close()
    _flip(str(tmp_path), keys[1], lambda n: n // 2)
    store = TieredStore(StoreConfig(**cfg))
    try:
        with pytest.raises(KVTierClientError) as err:
            hf.restore_cache(store, ns, list(range(38)))
        assert err.value.code == grpc.StatusCode.DATA_LOSS
    finally:
        store.close()
