"""The client core's shared state under concurrency, against a real server: first calls made at once
(threads of one blocking client, tasks of one asyncio client) open one shared-memory arena between them,
and an asyncio call cancelled while it waits for arena space leaves nothing leased."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kvtier.service.client.client import AsyncKVTierClient, KVTierClient
from kvtier.tiering import Namespace
from tests.service.client.test_shm_async import LAYOUT, small_arena  # noqa: F401 - a fixture
from tests.service.server.test_shm import blocks_for, same_bytes, shm_counters


def opened(target: str) -> int:
    return shm_counters(target).get("shm_arenas_opened", 0)


def test_threads_first_calls_open_one_arena(small_arena):
    ns = Namespace("default", "core-threads", "r1", LAYOUT)
    before = opened(small_arena.target)
    start, results = threading.Barrier(8), []
    with KVTierClient(small_arena.target, data_path="shm", timeout=30) as kv:
        def one(i: int) -> None:
            tokens = list(range(i * 1000, i * 1000 + 32))
            blocks = blocks_for(LAYOUT, 32, seed=i)
            start.wait()
            put = kv.put(ns, tokens, blocks)
            results.append(same_bytes(kv.get(put.keys).blocks, blocks))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert results == [True] * 8
    assert opened(small_arena.target) == before + 1


def test_tasks_first_calls_open_one_arena(small_arena):
    ns = Namespace("default", "core-tasks", "r1", LAYOUT)
    before = opened(small_arena.target)

    async def main():
        async with AsyncKVTierClient(small_arena.target, data_path="shm", timeout=30) as kv:
            async def one(i: int) -> bool:
                blocks = blocks_for(LAYOUT, 32, seed=i)
                put = await kv.put(ns, list(range(i * 1000, i * 1000 + 32)), blocks)
                return same_bytes((await kv.get(put.keys)).blocks, blocks)

            return await asyncio.gather(*(one(i) for i in range(8)))

    assert asyncio.run(main()) == [True] * 8
    assert opened(small_arena.target) == before + 1


def test_a_cancelled_async_call_leaves_nothing_leased(small_arena):
    ns = Namespace("default", "core-cancel", "r1", LAYOUT)
    tokens = list(range(16 * 4))

    async def main():
        async with AsyncKVTierClient(small_arena.target, data_path="shm", timeout=30) as kv:
            put = await kv.put(ns, tokens, blocks_for(LAYOUT, len(tokens), seed=9))
            link = kv._shm
            hog = link.slots.alloc_upto(link.arena.size, link.arena.size)  # no room for any call
            waiting = asyncio.create_task(kv.get(put.keys))
            await asyncio.sleep(0.3)
            assert not waiting.done()  # waiting for a range, without blocking this loop
            waiting.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiting
            leased = link.slots.leased_slots
            link.slots.free(hog)
            again = await asyncio.wait_for(kv.get(put.keys), 20)
            return leased, again

    leased, again = asyncio.run(main())
    assert leased == 1 and again.complete and len(again) == 4
