"""The shared-memory data path (service/shm) against real server processes.

Round trips are byte-exact for every KV dtype and for sessions larger than the arena; the gRPC
streams give the same bytes; a client SIGKILLed mid-Put or holding Get results loses its arena and
uploads and stores nothing; unfinished uploads expire; block tensors view the arena until they die; another process can neither open nor use a client's arena; remote targets never try
shared memory; the server can listen on a Unix socket and can switch shared memory off.
"""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
from unittest import mock

import grpc
import pytest
import torch

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.client import KVTierClient
from kvtier.service.client import requests as cp
from kvtier.service.client.types import KVTierClientError
from kvtier.service.client.shm import ShmLink, is_local_target
from kvtier.tiering.codec import checksum
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout

from tests.fixtures.server import ROOT, KVTierProcess
from tests.fixtures.wire import wait_for

#: 1 MiB arenas: every session below is larger, so it moves in several pieces.
SMALL_ARENA = {"KVTIER_SERVER__SHM_ARENA_BYTES": "1MiB", "KVTIER_STORE__LEASE_S": "2"}
AUTH = {"KVTIER_SECURITY__TOKENS": json.dumps({"tok-a": "a", "tok-b": "b"}),
        "KVTIER_SECURITY__ADMIN_TOKENS": json.dumps(["tok-admin"])}
DTYPES = ["float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]



def _child_env() -> dict[str, str]:
    """The environment for a client subprocess: this checkout first, any PYTHONPATH kept after it."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)}

def blocks_for(layout: BlockLayout, n_tokens: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    dtype = getattr(torch, layout.dtype)
    bt = layout.block_tokens
    return [torch.randn(2, layout.layers, layout.kv_heads, min(bt, n_tokens - s), layout.head_dim,
                        generator=g).to(dtype) for s in range(0, n_tokens, bt)]


def same_bytes(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and x.shape == y.shape and
                                    torch.equal(x.reshape(-1).view(torch.uint8), y.reshape(-1).view(torch.uint8))
                                    for x, y in zip(a, b))


def shm_counters(target: str, token: str | None = None) -> dict[str, int]:
    with KVTierClient(target, data_path="grpc", token=token, timeout=10) as c:
        return {k: v for k, v in c.stats().counters.items() if k.startswith("shm_")}


@pytest.fixture(scope="module")
def small_arena(tmp_path_factory) -> KVTierProcess:
    proc = KVTierProcess(tmp_path_factory.mktemp("shm"), extra_env=SMALL_ARENA).start()
    yield proc
    proc.kill()


@pytest.mark.parametrize("dtype", DTYPES)
def test_round_trip_every_dtype_larger_than_arena(small_arena, dtype):
    layout = BlockLayout(dtype, 4, 2, 64, 16)  # 32-64 KiB blocks
    n_tokens = 16 * (3 << 20) // layout.block_bytes() + 5  # ~3 MiB: three arenas' worth, last block partial
    ns = Namespace("default", f"shm-{dtype}", "r1", layout)
    ids = list(range(n_tokens))
    blocks = blocks_for(layout, n_tokens)
    with KVTierClient(small_arena.target, data_path="shm") as kv:
        info = kv.put(ns, ids, blocks, session_id=f"s-{dtype}")
        assert len(info.stored) == len(blocks)
        got = kv.get(session_id=f"s-{dtype}")
    assert got.complete and got.tokens == n_tokens
    assert same_bytes(blocks, got.blocks)
    with KVTierClient(small_arena.target, data_path="grpc") as kv:
        streamed = kv.get(session_id=f"s-{dtype}")
    assert same_bytes(streamed.blocks, got.blocks) and streamed.keys == got.keys
    counters = shm_counters(small_arena.target)
    assert counters["shm_uploads_open"] == 0 and counters["shm_upload_bytes"] == 0


def test_auto_uses_shm_on_loopback_and_streams_agree(small_arena):
    layout = BlockLayout("float16", 2, 2, 32, 16)
    ns = Namespace("default", "shm-auto", "r1", layout)
    blocks = blocks_for(layout, 40, seed=3)
    before = shm_counters(small_arena.target)
    with KVTierClient(small_arena.target) as kv:  # auto
        kv.put(ns, list(range(40)), blocks, session_id="auto")
        got = kv.get(session_id="auto", start_block=1, max_blocks=1)
    after = shm_counters(small_arena.target)
    assert after["shm_puts"] == before.get("shm_puts", 0) + 1 and after["shm_gets"] == before.get("shm_gets", 0) + 1
    assert same_bytes(blocks[1:2], got.blocks) and got.reason == "max_blocks" and not got.complete


@pytest.mark.parametrize("target", ["10.1.2.3:50051", "kvtier.example.com:50051", "dns:///kv.internal:443"])
def test_remote_target_never_tries_shm(target):
    assert not is_local_target(target)
    with mock.patch.object(ShmLink, "open", side_effect=AssertionError("tried shared memory")):
        kv = KVTierClient(target, data_path="auto", timeout=0.2)
        try:
            assert kv._link(0.2) is None
            with pytest.raises(KVTierClientError) as err:  # the stream is tried (and fails: nobody there)
                kv.get(session_id="x")
            assert err.value.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
        finally:
            kv.close()
    assert all(is_local_target(t) for t in ("127.0.0.1:1", "localhost:2", "[::1]:3", "unix:///tmp/x.sock"))


# -- a client that dies ----------------------------------------------------------------------------
_STALL = r"""
import sys, threading, torch
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client.client import KVTierClient
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.client import requests as cp
from kvtier.tiering.codec import checksum
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout
mode, target = sys.argv[1], sys.argv[2]
kv = KVTierClient(target, data_path="shm")
link = kv._link(10)
stall = threading.Event()
if mode == "put":  # the first piece of a two-piece put, then nothing: SIGKILL comes first
    layout = BlockLayout("float32", 4, 2, 64, 16)
    ns = Namespace("default", "shm-killed-put", "r1", layout)
    header = cp.put_header(ns, list(range(16 * 40)), first_block=0, block_count=40, session_id="killed",
                           durable=False, priority=0, ttl_seconds=0)
    size = layout.block_bytes()
    link.arena.array[:size] = 7
    req = pb.PutShmRequest(arena_id=link.arena_id, header=header, more=True)
    req.slots.add(offset=0, length=size)
    req.checksums.append(0)
    held = kv._stub.PutShm(req, timeout=60).upload_id
else:  # block tensors that view the arena, held
    held = kv.get(session_id="victim").blocks
print("STALLED", len(held), flush=True)
stall.wait()
"""


def _stall_child(mode: str, target: str) -> subprocess.Popen:
    child = subprocess.Popen([sys.executable, "-c", _STALL, mode, target], cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=_child_env())
    line = child.stdout.readline()
    if not line.startswith("STALLED"):
        child.kill()
        raise AssertionError(f"child did not stall: {line!r} {child.stderr.read()[-2000:]}")
    return child


@pytest.mark.parametrize("mode", ["put", "get"])
def test_client_sigkilled_mid_call_loses_its_arena_and_uploads(small_arena, mode):
    target = small_arena.target
    layout = BlockLayout("float32", 4, 2, 64, 16)
    victim_blocks = blocks_for(layout, 16 * 40, seed=5)
    with KVTierClient(target, data_path="grpc") as kv:
        kv.put(Namespace("default", "shm-victim", "r1", layout), list(range(16 * 40)), victim_blocks,
               session_id="victim")
    base = shm_counters(target)
    child = _stall_child(mode, target)
    try:
        mid = shm_counters(target)
        assert mid["shm_arenas_open"] == base["shm_arenas_open"] + 1
        assert mid["shm_uploads_open"] == base["shm_uploads_open"] + (mode == "put")
        child.send_signal(signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
    assert wait_for(lambda: (c := shm_counters(target))["shm_uploads_open"] == 0
                    and c["shm_arenas_open"] == base["shm_arenas_open"]
                    and c["shm_arenas_reclaimed"] == base.get("shm_arenas_reclaimed", 0) + 1)
    with KVTierClient(target, data_path="shm") as kv:  # the server keeps serving everybody else
        if mode == "put":  # nothing of the interrupted put is visible
            ns = Namespace("default", "shm-killed-put", "r1", layout)
            assert kv.lookup(ns, list(range(16 * 40))).cached_blocks == 0
            with pytest.raises(KVTierClientError) as err:
                kv.get(session_id="killed")
            assert err.value.code == grpc.StatusCode.NOT_FOUND
        assert same_bytes(victim_blocks, kv.get(session_id="victim").blocks)


# -- isolation ---------------------------------------------------------------------------------------
_INTRUDER = r"""
import json, os, socket, sys
import grpc
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb, kvtier_pb2_grpc as pb_grpc
target, socket_path, arena_id, ticket = sys.argv[1], sys.argv[2], sys.argv[3], bytes.fromhex(sys.argv[4])
out = {}
# replay the victim's (already redeemed) ticket, then a guessed one: no fd either way
for name, t in (("replayed", ticket), ("guessed", os.urandom(32))):
    s = socket.socket(socket.AF_UNIX); s.connect(socket_path); s.sendall(t)
    msg, fds, _, _ = socket.recv_fds(s, 1, 1)
    out[name] = len(fds); s.close()
with grpc.insecure_channel(target) as ch:
    stub = pb_grpc.KVCacheStub(ch)
    md = (("authorization", "Bearer tok-b"),)
    own = stub.OpenArena(pb.OpenArenaRequest(), metadata=md, timeout=10)
    out["own_arena_differs"] = own.arena_id != arena_id
    req = pb.GetShmRequest(arena_id=arena_id, request=pb.GetRequest(session_id="secret"),
                           region=pb.ShmSlot(offset=0, length=1 << 20))
    try:
        stub.GetShm(req, metadata=md, timeout=10)
        out["use_victim_arena"] = "OK"
    except grpc.RpcError as exc:
        out["use_victim_arena"] = exc.code().name
print(json.dumps(out), flush=True)
"""


def _memfd_links(pid: int | str) -> list[str]:
    links = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            links.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
        except OSError:
            pass
    return [link for link in links if "memfd:" in link]


def test_another_process_cannot_open_or_use_an_arena(kvtier_process):
    proc = kvtier_process("auth", extra_env=AUTH).start()
    layout = BlockLayout("float16", 2, 2, 32, 16)
    ns = Namespace("a", "shm-secret", "r1", layout)
    md = (("authorization", "Bearer tok-a"),)
    with KVTierClient(proc.target, token="tok-a", data_path="shm") as kv:
        kv.put(ns, list(range(32)), blocks_for(layout, 32), session_id="secret")
        kv.get(session_id="secret")
        link = kv._shm
        # a ticket of tenant a, redeemed by its owner before the intruder tries it
        resp = kv._stub.OpenArena(pb.OpenArenaRequest(), metadata=md, timeout=10)
        owner = socket.socket(socket.AF_UNIX)
        owner.connect(resp.socket_path)
        owner.sendall(resp.ticket)
        _, fds, _, _ = socket.recv_fds(owner, 1, 1)
        for fd in fds:
            os.close(fd)
        try:
            assert len(fds) == 1
            # no name anywhere: nothing in /dev/shm, no fd left open in the client or the server
            assert not [n for n in os.listdir("/dev/shm") if "kvtier" in n]
            # (the server closes its fd right after sending it: allow it the moment to get there)
            assert _memfd_links("self") == [] and wait_for(lambda: _memfd_links(proc.proc.pid) == [], 5)
            assert not os.get_inheritable(link._sock.fileno())
            with open("/proc/self/maps") as maps:
                assert "memfd:kvtier-arena" in maps.read()  # mapped, yet reachable by no name
            out = subprocess.run([sys.executable, "-c", _INTRUDER, proc.target, resp.socket_path, link.arena_id,
                                  resp.ticket.hex()], cwd=ROOT, capture_output=True, text=True, timeout=60,
                                 env=_child_env())
        finally:
            owner.close()
    result = json.loads(out.stdout.strip().splitlines()[-1]) if out.stdout.strip() else out.stderr
    assert result == {"replayed": 0, "guessed": 0, "own_arena_differs": True,
                      "use_victim_arena": "FAILED_PRECONDITION"}, result


# -- switches and listeners ------------------------------------------------------------------------
def test_shm_disabled_falls_back_or_refuses(kvtier_process):
    proc = kvtier_process("noshm", extra_env={"KVTIER_SERVER__SHM_ENABLED": "false"}).start()
    layout = BlockLayout("bfloat16", 2, 2, 32, 16)
    ns = Namespace("default", "shm-off", "r1", layout)
    blocks = blocks_for(layout, 20)
    with KVTierClient(proc.target) as kv:
        kv.put(ns, list(range(20)), blocks, session_id="off")
        assert kv._shm is None and same_bytes(blocks, kv.get(session_id="off").blocks)
    with KVTierClient(proc.target, data_path="shm") as kv, pytest.raises(KVTierClientError) as err:
        kv.get(session_id="off")
    assert err.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_grpc_over_unix_socket(tmp_path):
    sock_dir = tempfile.mkdtemp(prefix="kvt-", dir="/tmp")  # short: socket paths are limited to 107 bytes
    address = f"unix://{sock_dir}/grpc.sock"
    env = {**os.environ, "KVTIER_STORE__HOT_DEVICE": "cpu", "KVTIER_STORE__WARM_CAPACITY": "16MiB",
           "KVTIER_STORE__DURABLE_SYNC": "false"}
    env.pop("KVTIER_CONFIG", None)
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--host", address, "--port", "0",
                               "--data-dir", str(tmp_path / "data")], cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: os.path.exists(f"{sock_dir}/grpc.sock") or server.poll() is not None, 60)
        layout = BlockLayout("float16", 2, 2, 32, 16)
        ns = Namespace("default", "shm-unix", "r1", layout)
        blocks = blocks_for(layout, 33)
        with KVTierClient(address) as kv:  # unix: counts as local: auto takes shared memory
            kv.wait_ready(30)
            kv.put(ns, list(range(33)), blocks, session_id="u")
            got = kv.get(session_id="u")
            assert kv._shm is not None and same_bytes(blocks, got.blocks)
        with KVTierClient(address, data_path="grpc") as kv:
            assert same_bytes(blocks, kv.get(session_id="u").blocks)
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.kill()
        log.close()
        pathlib.Path(f"{sock_dir}/grpc.sock").unlink(missing_ok=True)
        os.rmdir(sock_dir)


def test_tampered_shm_block_raises_data_loss(small_arena):
    layout = BlockLayout("float16", 2, 2, 32, 16)
    ns = Namespace("default", "shm-tamper", "r1", layout)
    with KVTierClient(small_arena.target, data_path="shm") as kv:
        put = kv.put(ns, list(range(32)), blocks_for(layout, 32))
        link = kv._link(10)
        link.verify = True  # the server checked its own writes; this catches the caller's stray ones
        real = link.control.start  # GetShm goes over the arena's socket (service/client/shm_control.py)

        class Flipped:  # what a stray write into the arena would do, once the answer is in
            def __init__(self, pending):
                self.pending = pending

            def result(self):
                resp = self.pending.result()
                link.arena.array[resp.blocks[0].offset] ^= 1
                return resp

        with mock.patch.object(link.control, "start", side_effect=lambda req, **kw: Flipped(real(req, **kw))), \
                pytest.raises(KVTierClientError) as err:
            kv.get(put.keys)
        assert err.value.code == grpc.StatusCode.DATA_LOSS
        assert link.slots.leased_slots == 0 and link._aliased == 0  # the whole range went back
        assert kv.get(put.keys).complete  # the stored blocks were never touched


def test_block_tensors_view_the_arena_until_they_die(small_arena):
    layout = BlockLayout("float32", 4, 2, 64, 16)  # 64 KiB blocks; the alias budget is 512 KiB
    ns = Namespace("default", "shm-alias", "r1", layout)
    blocks = blocks_for(layout, 16 * 12, seed=7)
    with KVTierClient(small_arena.target, data_path="shm") as kv:
        put = kv.put(ns, list(range(16 * 12)), blocks)
        link = kv._link(10)
        first = kv.get(put.keys[:4]).blocks
        assert link._aliased == 4 * layout.block_bytes() and link.slots.leased_slots == 4
        base = link.arena.tensor.data_ptr()
        assert all(base <= b.data_ptr() < base + link.arena.size for b in first)
        more = kv.get(put.keys).blocks  # past the budget: the rest are copies, and nothing waits
        assert same_bytes(blocks, more) and same_bytes(blocks[:4], first)
        assert link._aliased <= link.alias_budget
        assert any(not base <= b.data_ptr() < base + link.arena.size for b in more)
        del first, more
        again = kv.get(put.keys[:1]).blocks  # a call reclaims the ranges of dead tensors first
        assert link.slots.leased_slots == 1 and same_bytes(blocks[:1], again)
        del again
        link._reclaim()
        assert link.slots.leased_slots == 0 and link._aliased == 0


def test_unfinished_upload_expires_and_stores_nothing(small_arena):
    layout = BlockLayout("float32", 4, 2, 64, 16)
    ns = Namespace("default", "shm-expire", "r1", layout)
    blocks = blocks_for(layout, 32, seed=9)
    base = shm_counters(small_arena.target)
    with KVTierClient(small_arena.target, data_path="shm") as kv:
        link = kv._link(10)
        header = cp.put_header(ns, list(range(32)), first_block=0, block_count=2, session_id="expire",
                               durable=False, priority=0, ttl_seconds=0)
        link.arena.array[:len(blocks[0].numpy().tobytes())] = blocks[0].reshape(-1).view(torch.uint8).numpy()
        req = pb.PutShmRequest(arena_id=link.arena_id, header=header, more=True)
        req.slots.add(offset=0, length=layout.block_bytes())
        req.checksums.append(checksum(link.arena.array[:layout.block_bytes()]))
        upload = kv._stub.PutShm(req, timeout=10).upload_id
        assert shm_counters(small_arena.target)["shm_uploads_open"] == base["shm_uploads_open"] + 1
        # parked, it is an open Put: its declared bytes count against the server's Put budget
        held = kv.stats().counters
        assert held["puts_open"] == 1 and held["put_pending_bytes"] == 2 * layout.block_bytes()
        assert held["put_received_bytes"] == layout.block_bytes()
        assert wait_for(lambda: shm_counters(small_arena.target).get("shm_uploads_expired", 0)
                        == base.get("shm_uploads_expired", 0) + 1, 10)
        assert kv.stats().counters["puts_open"] == 0 and kv.stats().counters["put_pending_bytes"] == 0
        last = pb.PutShmRequest(arena_id=link.arena_id, upload_id=upload)
        last.slots.add(offset=0, length=layout.block_bytes())
        last.checksums.append(0)
        with pytest.raises(grpc.RpcError) as err:
            kv._stub.PutShm(last, timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert kv.lookup(ns, list(range(32))).cached_blocks == 0
        assert shm_counters(small_arena.target)["shm_uploads_open"] == base["shm_uploads_open"]
