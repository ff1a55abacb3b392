"""A PutShm whose checksums do not match the arena's bytes stores nothing and answers INVALID_ARGUMENT,
through the real shared-memory path of a real server: in one call, and when the wrong checksum came
with an earlier piece of a multi-call upload. The same requests with the right checksums store, and so
do they with none at all (the server checksums its own copy); a count that is neither is refused."""

from __future__ import annotations

import grpc
import pytest
import torch

from kvtier.service.client import requests as cp
from kvtier.service.client.client import KVTierClient
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering.codec import checksum
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout
from tests.fixtures.server import KVTierProcess

LAYOUT = BlockLayout("float32", 2, 2, 32, 16)
N_TOKENS = 32  # two blocks


def _fill(link, seed: int) -> list[int]:
    """Write two blocks into the arena (slots 0 and 1); returns their true checksums."""
    size = LAYOUT.block_bytes()
    g = torch.Generator().manual_seed(seed)
    for i in range(2):
        link.arena.array[i * size:(i + 1) * size] = torch.randn(size // 4, generator=g).view(torch.uint8).numpy()
    return [checksum(link.arena.array[i * size:(i + 1) * size]) for i in range(2)]


def _put(kv, link, ns, session: str, sums: list[int], *, pieces: int):
    size = LAYOUT.block_bytes()
    header = cp.put_header(ns, list(range(N_TOKENS)), first_block=0, block_count=2, session_id=session,
                           durable=True, priority=0, ttl_seconds=0)
    if pieces == 1:
        req = pb.PutShmRequest(arena_id=link.arena_id, header=header, checksums=sums)
        req.slots.add(offset=0, length=size)
        req.slots.add(offset=size, length=size)
        return kv._stub.PutShm(req, timeout=10)
    first = pb.PutShmRequest(arena_id=link.arena_id, header=header, more=True, checksums=sums[:1])
    first.slots.add(offset=0, length=size)
    upload = kv._stub.PutShm(first, timeout=10).upload_id
    last = pb.PutShmRequest(arena_id=link.arena_id, upload_id=upload, checksums=sums[1:])
    last.slots.add(offset=size, length=size)
    return kv._stub.PutShm(last, timeout=10)


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    proc = KVTierProcess(tmp_path_factory.mktemp("shm-sum")).start()
    yield proc
    proc.kill()


@pytest.mark.parametrize("pieces,bad", [(1, 1), (2, 0), (2, 1)])
def test_wrong_checksum_stores_nothing(proc, pieces, bad):
    ns = Namespace("default", f"shm-sum-{pieces}-{bad}", "r1", LAYOUT)
    with KVTierClient(proc.target, data_path="shm") as kv:
        link = kv._link(10)
        sums = _fill(link, seed=pieces * 10 + bad)
        wrong = list(sums)
        wrong[bad] ^= 1
        with pytest.raises(grpc.RpcError) as err:
            _put(kv, link, ns, "bad", wrong, pieces=pieces)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "checksum" in err.value.details()
        assert kv.lookup(ns, list(range(N_TOKENS))).cached_blocks == 0
        with pytest.raises(Exception) as missing:
            kv.get(session_id="bad")
        assert missing.value.code == grpc.StatusCode.NOT_FOUND
        # the control: the same request with the arena's true checksums is stored
        done = _put(kv, link, ns, "good", sums, pieces=pieces).done
        assert len(done.stored) == 2
        assert kv.lookup(ns, list(range(N_TOKENS))).cached_blocks == 2


@pytest.mark.parametrize("pieces", [1, 2])
def test_no_checksums_means_the_server_checksums_its_copy(proc, pieces):
    """A PutShm without checksums (a caller that produced its blocks in the arena) stores them; what is
    stored verifies on the way out (the Get checks each block against the checksum kept with it)."""
    ns = Namespace("default", f"shm-nosum-{pieces}", "r1", LAYOUT)
    with KVTierClient(proc.target, data_path="shm") as kv:
        link = kv._link(10)
        _fill(link, seed=40 + pieces)
        want = bytes(link.arena.array[:2 * LAYOUT.block_bytes()])
        done = _put(kv, link, ns, "nosum", [], pieces=pieces).done
        assert len(done.stored) == 2
        link.arena.array[:2 * LAYOUT.block_bytes()] = 0  # the store holds its own copy
        got = kv.get(session_id="nosum")
        assert b"".join(b.reshape(-1).view(torch.uint8).numpy().tobytes() for b in got.blocks) == want


def test_checksum_count_must_match_the_slots(proc):
    ns = Namespace("default", "shm-count", "r1", LAYOUT)
    size = LAYOUT.block_bytes()
    with KVTierClient(proc.target, data_path="shm") as kv:
        link = kv._link(10)
        sums = _fill(link, seed=50)
        header = cp.put_header(ns, list(range(N_TOKENS)), first_block=0, block_count=2, session_id=None,
                               durable=False, priority=0, ttl_seconds=0)
        req = pb.PutShmRequest(arena_id=link.arena_id, header=header, checksums=sums[:1])
        req.slots.add(offset=0, length=size)
        req.slots.add(offset=size, length=size)
        with pytest.raises(grpc.RpcError) as err:
            kv._stub.PutShm(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "1 checksums for 2 slots" in err.value.details()
        assert kv.lookup(ns, list(range(N_TOKENS))).cached_blocks == 0
