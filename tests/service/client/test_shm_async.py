"""AsyncKVTierClient over the shared-memory data path, against a real server process: byte-exact round
trips in pieces larger than the arena, the same bytes as the gRPC streams, many concurrent calls
sharing one small arena without blocking the event loop, and the choice of path."""

from __future__ import annotations

import asyncio

import pytest

from kvtier.service.client.client import AsyncKVTierClient
from kvtier.service.client.types import KVTierClientError
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout

from tests.fixtures.server import KVTierProcess
from tests.service.server.test_shm import SMALL_ARENA, blocks_for, same_bytes, shm_counters

LAYOUT = BlockLayout("bfloat16", 4, 2, 64, 16)  # 32 KiB blocks; 1 MiB arenas


@pytest.fixture(scope="module")
def small_arena(tmp_path_factory) -> KVTierProcess:
    proc = KVTierProcess(tmp_path_factory.mktemp("shm-async"), extra_env=SMALL_ARENA).start()
    yield proc
    proc.stop()


def test_async_round_trip_over_shm_in_pieces(small_arena):
    ns = Namespace("default", "shm-async", "r1", LAYOUT)
    tokens = list(range(16 * 48 - 5))  # 48 blocks (1.5 MiB, the last one partial): more than the arena
    blocks = blocks_for(LAYOUT, len(tokens), seed=3)
    before = shm_counters(small_arena.target)

    async def main():
        async with AsyncKVTierClient(small_arena.target, data_path="shm") as kv:
            put = await kv.put(ns, tokens, blocks, session_id="a1")
            shm = await kv.get(session_id="a1")
            held = [b.clone() for b in shm.blocks]
        async with AsyncKVTierClient(small_arena.target, data_path="grpc") as kv:
            streams = await kv.get(put.keys)
        return put, held, shm, streams

    put, held, shm, streams = asyncio.run(main())
    assert len(put.stored) == 48 and shm.complete and streams.complete
    assert same_bytes(held, blocks) and same_bytes(streams.blocks, blocks)
    after = shm_counters(small_arena.target)
    assert after["shm_puts"] > before.get("shm_puts", 0) and after["shm_gets"] > before.get("shm_gets", 0)


def test_many_concurrent_async_calls_share_one_small_arena(small_arena):
    ns = Namespace("default", "shm-async-many", "r1", LAYOUT)

    async def one(kv: AsyncKVTierClient, i: int) -> bool:
        tokens = list(range(i * 10_000, i * 10_000 + 16 * 12))  # 384 KiB each: a few fit at once
        blocks = blocks_for(LAYOUT, len(tokens), seed=i)
        put = await kv.put(ns, tokens, blocks)
        got = await kv.get(put.keys)
        ok = got.complete and same_bytes(got.blocks, blocks)
        del got
        return ok

    async def main():
        # 12 puts of 384 KiB into a 1 MiB arena: most calls wait for a range another call holds. A driver
        # that blocked the event loop while waiting would stop the holder's response from being read, so
        # no range would ever free and every waiting call would end in DEADLINE_EXCEEDED (or wait_for).
        async with AsyncKVTierClient(small_arena.target, data_path="shm", timeout=30) as kv:
            return await asyncio.wait_for(asyncio.gather(*(one(kv, i) for i in range(12))), 90)

    assert all(asyncio.run(main()))


def test_async_path_choice(small_arena):
    async def main():
        async with AsyncKVTierClient("10.255.255.1:1", data_path="auto") as remote:
            assert remote._shm_tried  # a remote-looking target never tries shared memory
        with pytest.raises(ValueError):
            AsyncKVTierClient(small_arena.target, data_path="fast")
        async with AsyncKVTierClient(small_arena.target, data_path="shm") as kv:
            with pytest.raises(KVTierClientError) as err:
                await kv.put(Namespace("default", "x", "r", LAYOUT), list(range(16)),
                             [bytes(LAYOUT.block_bytes() + 1)])
            assert err.value.code.name == "INVALID_ARGUMENT"

    asyncio.run(main())
