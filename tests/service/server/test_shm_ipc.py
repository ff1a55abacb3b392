"""CUDA IPC gets (service/server/ipc.py, ipc_client.py, cuda_ipc.py) where no GPU is needed.

Against a real server process (its hot tier on the CPU): GetIpc refuses with FAILED_PRECONDITION and
says what to do; malformed requests are INVALID_ARGUMENT; ReleaseIpc of a lease nobody holds is
NOT_FOUND; ``get(device="cpu")`` is today's get, and a device this process cannot reach by CUDA IPC
falls back to the usual path. In process, with the CUDA calls mocked over a CPU "hot" tier: the hot
prefix, ``not_hot``/``miss``/``max_blocks``/``ipc_budget`` stops with the rest of the chain, leases
bound to their principal that end by release, expiry or their arena closing, and a cancelled call
that gives its buffer's reference back. The client's side of the exchange runs against a fake stub.
The CUDA path itself is tests/gpu/test_cuda_ipc.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from types import SimpleNamespace
from unittest import mock

import grpc
import pytest
import torch

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.server.auth import Principal
from kvtier.service.client.client import KVTierClient
from kvtier.service.client.types import GetResult, KVTierClientError
from kvtier.service.server.servicer import KVCacheServicer
from kvtier.service.server.core import Caller, ServerCore
from kvtier.service.wire import cuda_ipc
from kvtier.service.server import ipc
from kvtier.service.client import ipc as ipc_client
from kvtier.service.server.errors import IpcUnavailable, LeaseNotFound, ShmUnavailable
from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from kvtier.tiering.errors import InvalidBlock
from kvtier.tiering.keys import BlockKey, chain_keys

from tests.fixtures import wire
from tests.fixtures.server import KVTierProcess

LAYOUT = BlockLayout("float16", 2, 2, 32, 16)  # 8 KiB blocks
UUID = "3f1c8a2e-1234-5678-9abc-def012345678"


def blocks_for(n: int, seed: int = 0, layout: BlockLayout = LAYOUT) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(layout.shape(), generator=g).to(torch.float16) for _ in range(n)]


def same_bits(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and
                                    torch.equal(x.cpu().view(torch.uint8), y.cpu().view(torch.uint8))
                                    for x, y in zip(a, b))


# -- a real server without a CUDA hot tier -------------------------------------------------------------
@pytest.fixture(scope="module")
def cpu_server(tmp_path_factory) -> KVTierProcess:
    proc = KVTierProcess(tmp_path_factory.mktemp("ipc"), extra_env={"KVTIER_STORE__HOT_DEVICE": "cpu"}).start()
    yield proc
    proc.kill()


@pytest.fixture(scope="module")
def stored(cpu_server):
    """Six blocks of session ``ipc`` and their keys."""
    ns = Namespace("default", "ipc/model", "r1", LAYOUT)
    blocks = blocks_for(6, seed=1)
    with KVTierClient(cpu_server.target, data_path="grpc") as kv:
        keys = kv.put(ns, list(range(16 * 6)), blocks, session_id="ipc").keys
    return keys, blocks


def _get_ipc(kv: KVTierClient, **fields) -> pb.GetIpcResponse:
    return kv._stub.GetIpc(pb.GetIpcRequest(**fields), timeout=10)


def test_get_ipc_without_a_cuda_hot_tier_is_failed_precondition(cpu_server, stored):
    keys, _ = stored
    with KVTierClient(cpu_server.target, data_path="shm") as kv:
        link = kv._link(10)
        req = pb.GetRequest(keys=pb.KeyList(keys=[k.digest for k in keys]))
        with pytest.raises(grpc.RpcError) as err:
            _get_ipc(kv, arena_id=link.arena_id, request=req, device_uuid=UUID)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "not on a CUDA device" in err.value.details() and "GetShm" in err.value.details()
        with pytest.raises(grpc.RpcError) as err:  # someone else's (or no) arena: the same code
            _get_ipc(kv, arena_id="0" * 32, request=req, device_uuid=UUID)
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.mark.parametrize("fields, field", [
    (dict(arena_id="a" * 32, request=pb.GetRequest(keys=pb.KeyList()), device_uuid=UUID), "keys.keys"),
    (dict(arena_id="a" * 32, request=pb.GetRequest(session_id="ipc"), device_uuid="GPU-nope"), "device_uuid"),
    (dict(arena_id="a" * 32, request=pb.GetRequest(session_id="ipc"), device_uuid=""), "device_uuid"),
    (dict(request=pb.GetRequest(session_id="ipc"), device_uuid=UUID), "arena_id"),
    (dict(arena_id="a" * 32, request=pb.GetRequest(), device_uuid=UUID), "target"),
    (dict(arena_id="a" * 32, request=pb.GetRequest(session_id="ipc", start_block=7), device_uuid=UUID),
     "start_block"),
])
def test_malformed_get_ipc_is_invalid_argument(cpu_server, stored, fields, field):
    with KVTierClient(cpu_server.target, data_path="grpc") as kv:
        with pytest.raises(grpc.RpcError) as err:
            _get_ipc(kv, **fields)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert [v.field for d in wire.details(err.value) for v in d.field_violations] == [field]


def test_release_of_a_lease_nobody_holds(cpu_server):
    with KVTierClient(cpu_server.target, data_path="grpc") as kv:
        with pytest.raises(grpc.RpcError) as err:
            kv._stub.ReleaseIpc(pb.ReleaseIpcRequest(lease_id="ab" * 16), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as err:
            kv._stub.ReleaseIpc(pb.ReleaseIpcRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        counters = kv.stats().counters
    assert counters["ipc_leases_open"] == 0 and counters["ipc_staged_bytes"] == 0


@pytest.mark.parametrize("data_path", ["shm", "grpc"])
def test_get_on_the_cpu_is_todays_get(cpu_server, stored, data_path):
    keys, blocks = stored
    with KVTierClient(cpu_server.target, data_path=data_path) as kv:
        plain = kv.get(keys)
        for device in ("cpu", torch.device("cpu")):
            got = kv.get(keys, device=device)
            assert same_bits(got.blocks, plain.blocks) and same_bits(got.blocks, blocks)
            assert (got.keys, got.tiers, got.complete, got.tokens) == (plain.keys, plain.tiers, True, 96)
            assert all(b.device.type == "cpu" for b in got.blocks)
        part = kv.get(session_id="ipc", start_block=2, max_blocks=3, device="cpu")
    assert same_bits(part.blocks, blocks[2:5]) and part.reason == "max_blocks" and part.stopped_at == 5


def test_a_refused_get_ipc_falls_back_to_the_usual_path(cpu_server, stored):
    # "meta" stands in for a CUDA device of this process: GetIpc is asked (and refused by the CPU
    # server), then the blocks come through the arena and move with .to(device)
    keys, blocks = stored
    meta = torch.device("meta")
    with KVTierClient(cpu_server.target, data_path="shm") as kv, \
            mock.patch.object(ipc_client, "cuda_device", return_value=meta), \
            mock.patch.object(cuda_ipc, "device_uuid", return_value=UUID), \
            mock.patch.object(kv._stub, "GetIpc", wraps=kv._stub.GetIpc) as get_ipc:
        got = kv.get(keys[1:], device=meta)
        assert get_ipc.call_count == 1
        assert get_ipc.call_args.args[0].device_uuid == UUID
    assert got.complete and got.keys == keys[1:] and got.tokens == 80
    assert [(b.device.type, b.shape, b.dtype) for b in got.blocks] == [("meta", b.shape, b.dtype) for b in blocks[1:]]
    with KVTierClient(cpu_server.target, data_path="grpc") as kv, \
            mock.patch.object(ipc_client, "cuda_device", return_value=meta), \
            mock.patch.object(kv._stub, "GetIpc", side_effect=AssertionError("asked without a link")):
        assert kv.get(keys, device=meta).complete  # no arena (remote or streams only): never asked


# -- the server's side, in process, over a CPU "hot" tier ---------------------------------------------
class FakeRegistry:
    """An :class:`~service.server.shm_broker.ArenaRegistry` with one arena, ``"a" * 32``, of this process."""

    def __init__(self) -> None:
        self.arena = SimpleNamespace(alive=True, peer_pid=os.getpid())

    @contextlib.contextmanager
    def use(self, arena_id, principal):
        if arena_id != "a" * 32 or not self.arena.alive:
            raise ShmUnavailable("no such arena")
        yield self.arena

    def stats(self) -> dict[str, int]:
        return {}


class FakeContext:
    def invocation_metadata(self):
        return ()

    def time_remaining(self):
        return None


@pytest.fixture
def served(tmp_path):
    """A servicer over a CPU hot tier of 4 blocks with CUDA's share/sync/UUID mocked; the buffers shared
    (and the references given back unopened) are recorded."""
    store = TieredStore(StoreConfig(data_dir=str(tmp_path), hot_device="cpu", hot_capacity=4 * LAYOUT.block_bytes(),
                                    warm_capacity=16 * LAYOUT.block_bytes(), cold_enabled=False))
    servicer = KVCacheServicer(ServerCore(store), shm=FakeRegistry())
    shared, released = [], []

    def share(buffer):
        shared.append(buffer)
        return pb.CudaIpcBuffer(mem_handle=b"h" * 64, size_bytes=buffer.numel(), ref_counter_handle=b"/torch_1_2",
                                ref_counter_offset=len(shared))

    with mock.patch.object(ipc, "_hot_cuda_tier", side_effect=lambda s: s.memory[0]), \
            mock.patch.object(cuda_ipc, "device_uuid", return_value=UUID), \
            mock.patch.object(cuda_ipc, "share", side_effect=share), \
            mock.patch.object(cuda_ipc, "release_unopened", side_effect=lambda buf, dev=None: released.append(buf)), \
            mock.patch("torch.cuda.current_stream"):
        yield SimpleNamespace(store=store, servicer=servicer, shared=shared, released=released)
    store.close()


def put(store, n: int, tenant: str = "default", seed: int = 0) -> tuple[list[BlockKey], list[torch.Tensor]]:
    ns = Namespace(tenant, "ipc/model", f"r{seed}", LAYOUT)
    blocks = blocks_for(n, seed)
    store.put(ns, list(range(16 * n)), blocks, session_id=f"s{seed}")
    return chain_keys(ns, list(range(16 * n))), blocks


def run_get(served, keys=None, *, uuid_=UUID, session_id=None, **req):
    target = dict(keys=pb.KeyList(keys=[k.digest for k in keys])) if keys is not None else dict(session_id=session_id)
    request = pb.GetIpcRequest(arena_id="a" * 32, request=pb.GetRequest(**target, **req), device_uuid=uuid_)

    async def go():
        return await served.servicer.GetIpc(request, FakeContext())
    return asyncio.run(go())


def staged_blocks(served, resp: pb.GetIpcResponse) -> list[torch.Tensor]:
    """The blocks as the reader would copy them out of the last buffer shared."""
    buf = served.shared[-1]
    return [buf[b.offset:b.offset + b.header.size].view(torch.float16).reshape(tuple(b.header.shape))
            for b in resp.blocks]


def test_hot_blocks_are_staged_into_one_buffer(served):
    keys, blocks = put(served.store, 4)
    resp = run_get(served, keys)
    assert resp.lease_id and resp.lease_seconds == served.store.config.lease_s
    assert [bytes(b.header.key) for b in resp.blocks] == [k.digest for k in keys]
    assert all(b.header.tier == pb.TIER_HOT and b.offset % ipc.ALIGN == 0 for b in resp.blocks)
    assert same_bits(staged_blocks(served, resp), blocks)
    assert resp.buffer.size_bytes == served.shared[-1].numel() and resp.buffer.ref_counter_offset == 1
    assert (resp.end.complete, resp.end.blocks_sent, resp.end.reason, resp.end.tokens) == (True, 4, "", 64)
    stats = served.servicer.ipc.stats()
    assert stats["ipc_leases_open"] == 1 and stats["ipc_staged_bytes"] == served.shared[-1].numel()
    assert stats["ipc_gets"] == 1 and stats["ipc_blocks"] == 4
    served.store.leases.sweep()
    assert served.store.leases.pinned_keys() == 0  # the buffer is a copy: nothing in the tier stays pinned


def test_the_answer_stops_at_the_first_block_not_hot(served):
    keys, blocks = put(served.store, 6)  # 4 fit the hot tier: blocks 0 and 1 went down to warm
    assert [served.store.where(k) for k in keys] == ["warm"] * 2 + ["hot"] * 4
    resp = run_get(served, keys)
    assert not resp.blocks and not resp.lease_id and not resp.HasField("buffer")
    assert (resp.end.stopped_at, resp.end.reason) == (0, "not_hot") and list(resp.rest_keys) == [k.digest for k in keys]
    served.store.get(keys[0]), served.store.get(keys[1])  # promoted: 2 and 3 go down instead
    resp = run_get(served, session_id="s0", start_block=0)
    assert same_bits(staged_blocks(served, resp), blocks[:2])
    assert (resp.end.stopped_at, resp.end.reason, resp.end.complete) == (2, "not_hot", False)
    assert list(resp.rest_keys) == [k.digest for k in keys[2:]]
    assert served.store.where(keys[2]) == "warm"  # nothing was promoted by GetIpc
    resp = run_get(served, keys, start_block=4)  # from the middle: blocks 4 and 5 are hot
    assert [b.header.index for b in resp.blocks] == [4, 5] and resp.end.complete and resp.end.reason == ""


def test_misses_foreign_blocks_and_max_blocks(served):
    keys, blocks = put(served.store, 3)
    other, _ = put(served.store, 1, tenant="other", seed=1)
    resp = run_get(served, keys[:2] + other + keys[2:])
    assert len(resp.blocks) == 2 and (resp.end.stopped_at, resp.end.reason) == (2, "miss") and not resp.rest_keys
    resp = run_get(served, keys[:1] + [BlockKey(b"\x07" * 16)])
    assert len(resp.blocks) == 1 and resp.end.reason == "miss"
    resp = run_get(served, keys, max_blocks=2)
    assert len(resp.blocks) == 2 and (resp.end.reason, resp.end.complete) == ("max_blocks", False)
    with pytest.raises(IpcUnavailable, match="not this server's hot-tier GPU"):
        run_get(served, keys, uuid_=str(uuid.uuid4()))
    served.servicer.shm.arena.alive = False
    with pytest.raises(ShmUnavailable):
        run_get(served, keys)


def test_the_budget_stops_a_get_and_a_failed_staging_gives_it_back(served):
    keys, _ = put(served.store, 4)
    leases = served.servicer.ipc
    leases.max_bytes = 3 * LAYOUT.block_bytes()
    first = run_get(served, keys)
    assert len(first.blocks) == 3 and first.end.reason == "ipc_budget" and list(first.rest_keys) == [keys[3].digest]
    second = run_get(served, keys[3:])  # the first lease holds the budget
    assert not second.blocks and second.end.reason == "ipc_budget" and not second.lease_id
    leases.release(first.lease_id, None)
    with mock.patch.object(cuda_ipc, "share", side_effect=RuntimeError("cuda says no")), pytest.raises(RuntimeError):
        run_get(served, keys)
    with mock.patch("torch.empty", side_effect=torch.OutOfMemoryError("full")):
        assert run_get(served, keys).end.reason == "ipc_budget"
    assert leases.stats()["ipc_staged_bytes"] == 0 and leases.stats()["ipc_leases_open"] == 0


def test_leases_belong_to_their_principal_and_end_once(served):
    keys, _ = put(served.store, 2)
    leases = served.servicer.ipc
    alice, bob = Principal("alice"), Principal("bob")

    async def scenario():
        staged = await asyncio.to_thread(ipc.stage, served.store, leases, torch.device("cpu"), keys, "default", None)
        lease = leases.add(alice, served.servicer.shm.arena, staged)
        with pytest.raises(LeaseNotFound):
            leases.release(lease, bob)
        leases.release(lease, alice)
        with pytest.raises(LeaseNotFound):
            leases.release(lease, alice)
        leases.lease_s = 0.05
        expiring = leases.add(alice, served.servicer.shm.arena, await asyncio.to_thread(
            ipc.stage, served.store, leases, torch.device("cpu"), keys, "default", None))
        await asyncio.sleep(0.2)
        with pytest.raises(LeaseNotFound):
            leases.release(expiring, alice)
        leases.lease_s = 60
        leases.add(alice, served.servicer.shm.arena, await asyncio.to_thread(
            ipc.stage, served.store, leases, torch.device("cpu"), keys, "default", None))
        served.servicer.shm.arena.alive = False  # the caller's arena closed
        leases.sweep()

    asyncio.run(scenario())
    stats = leases.stats()
    assert (stats["ipc_leases_released"], stats["ipc_leases_expired"], stats["ipc_leases_orphaned"]) == (1, 1, 1)
    assert stats["ipc_leases_open"] == 0 and stats["ipc_staged_bytes"] == 0


def test_release_ipc_rpc_checks_the_caller(served):
    keys, _ = put(served.store, 2)
    resp = run_get(served, keys)
    wrong = SimpleNamespace(invocation_metadata=lambda: ())

    async def release(lease_id):
        return await served.servicer.ReleaseIpc(pb.ReleaseIpcRequest(lease_id=lease_id), wrong)
    with mock.patch.object(served.servicer.core, "caller", return_value=Caller(Principal("mallory"), "mallory")), \
            pytest.raises(LeaseNotFound):
        asyncio.run(release(resp.lease_id))
    asyncio.run(release(resp.lease_id))
    with pytest.raises(InvalidBlock):
        asyncio.run(release(""))


def test_a_cancelled_get_gives_its_buffer_back(served):
    keys, _ = put(served.store, 2)
    slow = ipc.stage

    def stage(*args):
        import time
        time.sleep(0.2)
        return slow(*args)

    async def scenario():
        task = asyncio.ensure_future(served.servicer.GetIpc(pb.GetIpcRequest(
            arena_id="a" * 32, request=pb.GetRequest(keys=pb.KeyList(keys=[k.digest for k in keys])),
            device_uuid=UUID), FakeContext()))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0.4)  # the staging finishes, and is undone

    with mock.patch.object(ipc, "stage", side_effect=stage):
        asyncio.run(scenario())
    assert len(served.shared) == 1 and served.released == [pb.CudaIpcBuffer(
        mem_handle=b"h" * 64, size_bytes=served.shared[0].numel(), ref_counter_handle=b"/torch_1_2",
        ref_counter_offset=1)]
    assert served.servicer.ipc.stats()["ipc_staged_bytes"] == 0 and served.servicer.ipc.stats()["ipc_leases_open"] == 0


# -- the client's side, against a fake stub -----------------------------------------------------------
class FakeStub:
    """Answers GetIpc from a script of responses and records ReleaseIpc."""

    def __init__(self, answers) -> None:
        self.answers = list(answers)
        self.requests, self.released = [], []

    def GetIpc(self, request, timeout=None, metadata=None):
        self.requests.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, grpc.StatusCode):
            raise FakeRpcError(answer)
        return answer

    def ReleaseIpc(self, request, timeout=None, metadata=None):
        self.released.append(request.lease_id)
        return pb.ReleaseIpcResponse()


class FakeRpcError(grpc.RpcError):
    def __init__(self, code) -> None:
        self._code = code

    def code(self):
        return self._code

    def details(self):
        return "refused"


def answer(blocks: list[torch.Tensor], keys: list[BlockKey], first: int, reason: str, rest: list[BlockKey],
           lease: str, complete: bool = False) -> tuple[pb.GetIpcResponse, torch.Tensor]:
    """A GetIpc answer for ``blocks`` at chain positions ``first…``, and its buffer."""
    raw = [b.reshape(-1).view(torch.uint8) for b in blocks]
    buffer = torch.cat(raw) if raw else torch.empty(0, dtype=torch.uint8)
    resp = pb.GetIpcResponse(lease_id=lease if blocks else "", rest_keys=[k.digest for k in rest])
    pos = 0
    for i, (b, r, k) in enumerate(zip(blocks, raw, keys)):
        resp.blocks.add(offset=pos, header=pb.BlockHeader(index=first + i, key=k.digest, dtype="float16",
                                                          shape=list(b.shape), tier=pb.TIER_HOT, size=r.numel()))
        pos += r.numel()
    if blocks:
        resp.buffer.CopyFrom(pb.CudaIpcBuffer(mem_handle=lease.encode(), size_bytes=buffer.numel()))
    resp.end.CopyFrom(pb.GetEnd(blocks_sent=len(blocks), stopped_at=first + len(blocks), reason=reason,
                                complete=complete, tokens=16 * len(blocks)))
    return resp, buffer


def test_client_joins_ipc_pieces_and_the_usual_path():
    blocks = blocks_for(6, seed=4)
    keys = [BlockKey(bytes([i]) * 16) for i in range(6)]
    # the caller asks from block 1: two blocks by IPC (budget), one more (then not hot), the rest usual
    a1, b1 = answer(blocks[1:3], keys[1:3], 1, "ipc_budget", keys[3:], "L1")
    a2, b2 = answer(blocks[3:4], keys[3:4], 0, "not_hot", keys[4:], "L2")
    buffers = {"L1": b1, "L2": b2}
    stub = FakeStub([a1, a2])
    fetched = []

    def fetch(request, timeout):
        fetched.append(request)
        return GetResult(blocks[4:5], keys[4:5], ["warm"], False, 1, "max_blocks", 16)

    def copy_out(buffer, device, ranges):
        buf = buffers[buffer.mem_handle.decode()]
        return [buf[o:o + n].clone() for o, n in ranges]

    link = SimpleNamespace(arena_id="a" * 32)
    cpu = torch.device("cpu")
    req = pb.GetRequest(keys=pb.KeyList(keys=[k.digest for k in keys]), start_block=1, max_blocks=4)
    with mock.patch.object(ipc_client, "cuda_device", return_value=cpu), \
            mock.patch.object(cuda_ipc, "device_uuid", return_value=UUID), \
            mock.patch.object(cuda_ipc, "copy_out", side_effect=copy_out):
        got = ipc_client.get_on_device(stub, None, 10, link, req, cpu, fetch)
    assert stub.released == ["L1", "L2"]
    assert [list(r.request.keys.keys) for r in stub.requests[1:]] == [[k.digest for k in keys[3:]]]
    assert stub.requests[1].request.max_blocks == 2  # 4 asked, 2 sent
    assert [list(r.keys.keys) for r in fetched] == [[k.digest for k in keys[4:]]] and fetched[0].max_blocks == 1
    assert same_bits(got.blocks, blocks[1:5]) and got.keys == keys[1:5]
    assert got.tiers == ["hot", "hot", "hot", "warm"] and got.tokens == 64
    assert (got.complete, got.stopped_at, got.reason) == (False, 5, "max_blocks")


@pytest.mark.parametrize("refusal", [grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.UNIMPLEMENTED])
def test_client_falls_back_when_refused_and_raises_otherwise(refusal):
    blocks = blocks_for(2, seed=5)
    keys = [BlockKey(bytes([i]) * 16) for i in range(2)]
    whole = GetResult(blocks, keys, ["warm", "warm"], True, None, "", 32)
    cpu = torch.device("cpu")
    req = pb.GetRequest(keys=pb.KeyList(keys=[k.digest for k in keys]))
    link = SimpleNamespace(arena_id="a" * 32)
    with mock.patch.object(ipc_client, "cuda_device", return_value=cpu), \
            mock.patch.object(cuda_ipc, "device_uuid", return_value=UUID):
        got = ipc_client.get_on_device(FakeStub([refusal]), None, 10, link, req, cpu, lambda r, t: whole)
        assert same_bits(got.blocks, blocks) and got.complete and got.tiers == ["warm", "warm"]
        with pytest.raises(KVTierClientError) as err:
            ipc_client.get_on_device(FakeStub([grpc.StatusCode.NOT_FOUND]), None, 10, link, req, cpu,
                                     lambda r, t: whole)
        assert err.value.code == grpc.StatusCode.NOT_FOUND


# -- the handle's fields -------------------------------------------------------------------------------
def test_uuids_and_handle_fields_are_checked():
    assert cuda_ipc.normalize_uuid(f"GPU-{UUID.upper()}") == UUID == cuda_ipc.normalize_uuid(UUID.replace("-", ""))
    for bad in ("", "MIG-" + UUID, UUID[:-1], "{" + UUID + "}", "x" * 36):
        with pytest.raises(ValueError):
            cuda_ipc.normalize_uuid(bad)
    good = pb.CudaIpcBuffer(mem_handle=b"h" * 64, size_bytes=100, ref_counter_handle=b"/torch_12_34_0",
                            ref_counter_offset=9999)
    cuda_ipc._check(good, [(0, 100), (40, 60)])
    for bad in (dict(ref_counter_handle=b"/etc/passwd"), dict(ref_counter_offset=10000), dict(mem_handle=b""),
                dict(size_bytes=0)):
        buf = pb.CudaIpcBuffer()
        buf.CopyFrom(good)
        for name, value in bad.items():
            setattr(buf, name, value)
        with pytest.raises(ValueError):
            cuda_ipc._check(buf)
    with pytest.raises(ValueError):
        cuda_ipc._check(good, [(50, 51)])
    with pytest.raises(ValueError):
        cuda_ipc.share(torch.zeros(4, dtype=torch.uint8))  # not a CUDA tensor
