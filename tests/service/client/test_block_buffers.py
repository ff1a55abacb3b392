"""Leased block buffers (``KVTierClient.block_buffers``) against a real server process.

Over shared memory the buffers view the client's arena and a Put names them in place (no copy, no
client checksum): the blocks round trip bit-exact, and the server's checksum is of the copy it keeps,
so a buffer rewritten during the Put never leaves a stored block whose checksum differs from its bytes
(a Get, which verifies every block on the way out, reads it back). A payload that is only partly a
buffer, starts inside one, or is arena memory that no buffer holds is copied like any other. Over
gRPC the buffers are ordinary tensors. The asyncio client leases the same way.
"""

from __future__ import annotations

import asyncio
import threading
from unittest import mock

import grpc
import numpy as np
import pytest
import torch

from kvtier.service.client import shm as shm_module
from kvtier.service.client.client import AsyncKVTierClient, KVTierClient
from kvtier.service.client.types import KVTierClientError
from kvtier.service.wire.arena import ALIGNMENT
from kvtier.tiering.bytecopy import copy_many
from kvtier.tiering.keys import Namespace, chain_keys
from kvtier.tiering.layout import BlockLayout

from tests.fixtures.server import KVTierProcess

LAYOUT = BlockLayout("bfloat16", 4, 2, 64, 16)  # 32 KiB blocks
TOKENS = 16 * 3 + 5  # three full blocks and a partial one


def _ns(name: str) -> Namespace:
    return Namespace("default", f"buffers-{name}", "r1", LAYOUT)


def _fill(buffers: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Random blocks written into ``buffers``; returns copies of what was written."""
    g = torch.Generator().manual_seed(seed)
    for b in buffers:
        b.copy_(torch.randn(b.shape, generator=g).to(b.dtype))
    return [b.clone() for b in buffers]


def _in_arena(link, t: torch.Tensor) -> bool:
    base = link.arena.array.ctypes.data
    return base <= t.data_ptr() and t.data_ptr() + t.nbytes <= base + link.arena.size


def _same(got: list[torch.Tensor], want: list[torch.Tensor]) -> bool:
    return len(got) == len(want) and all(
        torch.equal(g.reshape(-1).view(torch.uint8), w.reshape(-1).view(torch.uint8)) for g, w in zip(got, want))


@pytest.fixture(scope="module")
def proc(tmp_path_factory):
    proc = KVTierProcess(tmp_path_factory.mktemp("buffers")).start()
    yield proc
    proc.kill()


def _copied(spy) -> int:
    """Blocks the client copied into its arena, over every ``copy_many`` call the spy saw."""
    return sum(len(call.args[0]) for call in spy.call_args_list)


def test_buffers_are_named_in_place_and_round_trip(proc):
    ids = list(range(TOKENS))
    with KVTierClient(proc.target, data_path="shm") as kv:
        bufs = kv.block_buffers(_ns("named"), TOKENS, first_block=1)
        link = kv._link(10)
        assert [tuple(b.shape) for b in bufs] == [LAYOUT.shape(16), LAYOUT.shape(16), LAYOUT.shape(5)]
        assert all(b.dtype == torch.bfloat16 and _in_arena(link, b) for b in bufs)
        head = _fill([torch.empty(LAYOUT.shape(16), dtype=torch.bfloat16)], seed=1)
        want = _fill(bufs, seed=2)
        with mock.patch.object(shm_module, "copy_many", wraps=copy_many) as spy:
            kv.put(_ns("named"), ids, head)  # an ordinary tensor: copied
            assert _copied(spy) == 1
            info = kv.put(_ns("named"), ids, bufs, first_block=1, session_id="named")
            assert _copied(spy) == 1  # the buffers were not copied
        assert len(info.stored) == 3
        del bufs
        got = kv.get(session_id="named")
        assert got.complete and _same(got.blocks, head + want)


def test_buffers_stay_leased_until_dropped(proc):
    with KVTierClient(proc.target, data_path="shm") as kv:
        kv._link(10)
        link = kv._shm
        before = link.slots.leased_bytes
        bufs = kv.block_buffers(_ns("lease"), 64)  # four full blocks
        assert link.slots.leased_bytes == before + 4 * ALIGNMENT * -(-LAYOUT.block_bytes() // ALIGNMENT)
        view = bufs[0][0]  # a view keeps its buffer leased
        del bufs
        kv.get([chain_keys(_ns("lease"), list(range(16)))[0]])  # any call reclaims dropped buffers
        assert link.slots.leased_bytes == before + ALIGNMENT * -(-LAYOUT.block_bytes() // ALIGNMENT)
        del view
        kv.get([chain_keys(_ns("lease"), list(range(16)))[0]])
        assert link.slots.leased_bytes == before


def test_past_the_budget_buffers_are_ordinary_memory(proc):
    with KVTierClient(proc.target, data_path="shm") as kv:
        link = kv._link(10)
        link.alias_budget = 2 * LAYOUT.block_bytes() + ALIGNMENT  # room for two buffers
        bufs = kv.block_buffers(_ns("budget"), TOKENS)
        assert [_in_arena(link, b) for b in bufs] == [True, True, False, False]
        want = _fill(bufs, seed=3)
        ids = list(range(100, 100 + TOKENS))
        with mock.patch.object(shm_module, "copy_many", wraps=copy_many) as spy:
            kv.put(_ns("budget"), ids, bufs)
        assert _copied(spy) == 2
        assert _same(kv.get(chain_keys(_ns("budget"), ids)).blocks, want)


def test_arena_memory_that_is_not_a_buffer_start_is_copied(proc):
    """A payload starting inside a buffer (misaligned with it, reaching past it) or in arena memory no
    buffer holds is copied, never named: its range may be reused under the call (copied, it is only
    the caller's own stray memory that can change, never a range the server reads)."""
    size = LAYOUT.block_bytes()
    with KVTierClient(proc.target, data_path="shm") as kv:
        link = kv._link(10)
        bufs = kv.block_buffers(_ns("inside"), 4 * 16)
        for b in bufs:
            b.reshape(-1).view(torch.uint8).copy_(torch.randint(0, 256, (size,), dtype=torch.uint8))
        start = bufs[0].data_ptr() - link.arena.array.ctypes.data
        inside = [link.arena.array[start + shift:start + shift + size] for shift in (64, ALIGNMENT)]
        free = link.slots.alloc(size)  # a range no buffer holds (then given back: free arena memory)
        link.slots.free(free)
        stray = link.arena.array[free.offset:free.offset + size]
        stray[:] = 7
        payloads = [*inside, stray]
        want = [torch.from_numpy(p.copy()) for p in payloads]
        ids = list(range(200, 200 + 16 * len(payloads)))
        with mock.patch.object(shm_module, "copy_many", wraps=copy_many) as spy:
            kv.put(_ns("inside"), ids, payloads)
        assert _copied(spy) == len(payloads)
        got = kv.get(chain_keys(_ns("inside"), ids))
        # (the stray range is free: this very put may lease it for its copies, so its bytes are not checked)
        assert len(got.blocks) == len(want) and all(
            np.array_equal(g.reshape(-1).view(torch.uint8).numpy(), w.numpy()) for g, w in zip(got.blocks[:2], want))


def test_a_buffer_rewritten_during_the_put_is_stored_with_its_own_checksum(proc):
    """The caller keeps writing into a buffer while it is put: whatever bytes the server copied, the
    checksum stored with them is theirs (the Get verifies each block against it on the way out)."""
    ns = _ns("racing")
    with KVTierClient(proc.target, data_path="shm") as kv:
        for rep in range(5):
            bufs = kv.block_buffers(ns, 64)
            _fill(bufs, seed=rep)
            stop = threading.Event()

            def scribble() -> None:
                while not stop.is_set():
                    for b in bufs:
                        b.add_(1)

            writer = threading.Thread(target=scribble)
            writer.start()
            try:
                ids = list(range(1000 * rep, 1000 * rep + 64))
                assert len(kv.put(ns, ids, bufs).stored) == 4
            finally:
                stop.set()
                writer.join()
            got = kv.get(chain_keys(ns, ids))  # DATA_LOSS here if a stored checksum disagreed with its bytes
            assert len(got.blocks) == 4


def test_over_grpc_buffers_are_ordinary_tensors(proc):
    ids = list(range(TOKENS))
    with KVTierClient(proc.target, data_path="grpc") as kv:
        bufs = kv.block_buffers(_ns("grpc"), TOKENS)
        assert kv._shm is None and len(bufs) == 4
        want = _fill(bufs, seed=4)
        kv.put(_ns("grpc"), ids, bufs)
        assert _same(kv.get(chain_keys(_ns("grpc"), ids)).blocks, want)
        with pytest.raises(KVTierClientError) as err:
            kv.block_buffers(_ns("grpc"), TOKENS, first_block=5)
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_async_client_leases_the_same_way(proc):
    async def main() -> None:
        ids = list(range(500, 500 + TOKENS))
        async with AsyncKVTierClient(proc.target, data_path="shm") as kv:
            bufs = await kv.block_buffers(_ns("async"), TOKENS)
            link = kv._shm
            assert all(_in_arena(link, b) for b in bufs)
            want = _fill(bufs, seed=5)
            with mock.patch.object(shm_module, "copy_many", wraps=copy_many) as spy:
                await kv.put(_ns("async"), ids, bufs)
            assert _copied(spy) == 0
            assert _same((await kv.get(chain_keys(_ns("async"), ids))).blocks, want)

    asyncio.run(main())
