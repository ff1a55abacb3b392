"""Arena prefault: every page of the shared memory is allocated by one read pass (fstat's block count
says so), a stop event ends it early, and a server hands its arenas out prefaulted only with
``server.shm_prefault`` on (off by default)."""

from __future__ import annotations

import os
import threading

import grpc
import pytest

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from kvtier.service.wire.arena import PREFAULT_STEP, Arena, create_memfd

SIZE = 4 * PREFAULT_STEP


def _allocated(fd: int) -> int:
    return os.fstat(fd).st_blocks * 512


def test_prefault_allocates_every_page_and_keeps_the_bytes():
    fd = create_memfd(SIZE)
    try:
        arena = Arena(fd, SIZE)
        arena.array[5] = 7  # bytes written before are kept: the pass only reads
        assert _allocated(fd) < SIZE // 4
        arena.prefault()
        assert _allocated(fd) >= SIZE
        assert int(arena.array[5]) == 7 and int(arena.array[SIZE - 1]) == 0
    finally:
        os.close(fd)


def test_a_set_stop_event_ends_the_pass_before_it_allocates():
    fd = create_memfd(SIZE)
    try:
        stop = threading.Event()
        stop.set()
        Arena(fd, SIZE).prefault_in_background(stop).join(10)
        assert _allocated(fd) == 0
    finally:
        os.close(fd)


@pytest.mark.parametrize("setting, want", [(None, False), ("true", True)])
def test_the_server_says_whether_it_prefaults(kvtier_process, setting, want):
    env = {} if setting is None else {"KVTIER_SERVER__SHM_PREFAULT": setting}
    proc = kvtier_process(f"prefault-{setting}", extra_env=env).start()
    with grpc.insecure_channel(proc.target) as channel:
        resp = pb_grpc.KVCacheStub(channel).OpenArena(pb.OpenArenaRequest(size_bytes=SIZE), timeout=10)
    assert resp.prefault is want and resp.size_bytes == SIZE
