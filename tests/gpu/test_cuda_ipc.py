"""CUDA IPC on a real GPU (service/wire/cuda_ipc.py, ipc.py, ipc_client.py); skipped without CUDA.

A buffer crosses processes byte-exact as the plain fields of a ``CudaIpcBuffer``. A server whose hot
tier is on cuda:0 hands its hot blocks to ``KVTierClient.get(device="cuda:0")`` by CUDA IPC
(bit-identical CUDA tensors, counted in its Stats) and the rest of the chain through the arena; a
lease holds its buffer until ReleaseIpc and no longer; a caller naming another GPU is refused.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid

import grpc
import pytest
import torch

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.client import KVTierClient
from kvtier.service.wire.cuda_ipc import copy_out, device_uuid, normalize_uuid, share
from kvtier.tiering.codec import checksum
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout

from tests.fixtures.server import KVTierProcess

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LAYOUT = BlockLayout("float16", 4, 2, 64, 16)  # 32 KiB blocks


def _child(buffers, results) -> None:
    for raw in iter(buffers.get, None):
        buf = pb.CudaIpcBuffer.FromString(raw)
        got = copy_out(buf, "cuda:0", [(0, buf.size_bytes)])[0]
        results.put((str(got.device), checksum(got.cpu().numpy())))


@pytest.mark.parametrize("shape", [(2, 32, 8, 16, 128), (2, 30, 3, 7, 64)])  # 2 MiB Llama-8B block; partial block
def test_block_crosses_processes_byte_exact(shape):
    block = torch.randn(shape, device="cuda").to(torch.float16)
    flat = block.reshape(-1).view(torch.uint8)  # the block's whole storage, as bytes
    ctx = mp.get_context("spawn")
    buffers, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_child, args=(buffers, results))
    child.start()
    try:
        buffers.put(share(flat).SerializeToString())
        device, csum = results.get(timeout=120)
        buffers.put(None)
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
    assert device.startswith("cuda")
    assert csum == checksum(flat.cpu().numpy())


def test_cpu_tensor_is_refused():
    with pytest.raises(ValueError):
        share(torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(ValueError):  # not its whole storage
        share(torch.zeros(8, dtype=torch.uint8, device="cuda")[2:])


def test_device_uuid_is_canonical():
    text = device_uuid(0)
    assert text == normalize_uuid(str(torch.cuda.get_device_properties(0).uuid)) == normalize_uuid(f"GPU-{text}")


# -- through the server ----------------------------------------------------------------------------------
@pytest.fixture
def gpu_server(tmp_path):
    """A server whose hot tier is 4 blocks of cuda:0."""
    proc = KVTierProcess(tmp_path / "srv", extra_env={"KVTIER_STORE__HOT_DEVICE": "cuda:0",
                                                      "KVTIER_STORE__HOT_CAPACITY": str(4 * LAYOUT.block_bytes()),
                                                      "KVTIER_STORE__WARM_CAPACITY": "64MiB"}).start()
    yield proc
    proc.kill()


def _blocks(n: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.shape(), generator=g).to(torch.float16) for _ in range(n)]


def _ipc_counters(kv: KVTierClient) -> dict[str, int]:
    counters = kv.stats().counters
    return {k: counters.get(f"ipc_{k}", 0) for k in ("gets", "blocks", "leases_released", "leases_open",
                                                      "staged_bytes")}


def test_get_to_cuda_takes_hot_blocks_by_ipc_and_the_rest_by_the_arena(gpu_server):
    ns = Namespace("default", "gpu/ipc", "r1", LAYOUT)
    blocks = _blocks(6)
    tokens = list(range(16 * 6))
    with KVTierClient(gpu_server.target, data_path="shm") as kv:
        keys = kv.put(ns, tokens, blocks, session_id="s").keys
        kv.prefetch(keys[:2], wait=True)  # 0 and 1 (demoted by the put) come back up; 2 and 3 go down
        assert kv.lookup(ns, tokens).tiers == ["hot", "hot", "warm", "warm", "hot", "hot"]
        before = _ipc_counters(kv)
        got = kv.get(session_id="s", device="cuda:0")
        after = _ipc_counters(kv)
        pinned = kv.stats().pinned_blocks
    assert got.complete and got.keys == keys and got.tokens == 96 and got.tiers[:2] == ["hot", "hot"]
    assert all(b.device == torch.device("cuda", 0) for b in got.blocks)
    assert all(torch.equal(a.cpu().view(torch.uint8), b.view(torch.uint8)) and a.shape == b.shape
               for a, b in zip(got.blocks, blocks))
    assert after["gets"] == before["gets"] + 1 and after["blocks"] == before["blocks"] + 2  # by CUDA IPC: 0 and 1
    assert after["leases_released"] == before["leases_released"] + 1
    assert after["leases_open"] == 0 and after["staged_bytes"] == 0 and pinned == 0


def test_a_lease_holds_its_buffer_until_released(gpu_server):
    ns = Namespace("default", "gpu/lease", "r1", LAYOUT)
    blocks = _blocks(2, seed=1)
    with KVTierClient(gpu_server.target, data_path="shm") as kv:
        keys = kv.put(ns, list(range(32)), blocks).keys
        link = kv._link(10)
        req = pb.GetRequest(keys=pb.KeyList(keys=[k.digest for k in keys]))
        resp = kv._stub.GetIpc(pb.GetIpcRequest(arena_id=link.arena_id, request=req, device_uuid=device_uuid(0)),
                               timeout=30)
        assert len(resp.blocks) == 2 and resp.lease_id and resp.end.complete
        held = _ipc_counters(kv)
        assert held["leases_open"] == 1 and held["staged_bytes"] >= 2 * LAYOUT.block_bytes()
        copies = copy_out(resp.buffer, "cuda:0", [(b.offset, b.header.size) for b in resp.blocks])
        assert all(torch.equal(c.cpu(), b.reshape(-1).view(torch.uint8)) for c, b in zip(copies, blocks))
        assert [checksum(c.cpu().numpy()) for c in copies] == [b.header.checksum for b in resp.blocks]
        kv._stub.ReleaseIpc(pb.ReleaseIpcRequest(lease_id=resp.lease_id), timeout=10)
        released = _ipc_counters(kv)
        assert released["leases_open"] == 0 and released["staged_bytes"] == 0
        with pytest.raises(grpc.RpcError) as err:
            kv._stub.ReleaseIpc(pb.ReleaseIpcRequest(lease_id=resp.lease_id), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:  # another GPU
            kv._stub.GetIpc(pb.GetIpcRequest(arena_id=link.arena_id, request=req, device_uuid=str(uuid.uuid4())),
                            timeout=30)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
