"""kvtier.service.server.shm_rpc._fill in-process: the server answers only blocks whose bytes in the arena match their
checksum, on a real store and a real memfd arena (no gRPC: the corruption is planted in the warm tier,
which no client can reach)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
import torch

from kvtier.service.wire.arena import Arena, create_memfd
from kvtier.service.server.shm_broker import ServerArena
from kvtier.service.server.shm_rpc import _fill
from kvtier.tiering.config import StoreConfig
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.store import TieredStore

LAYOUT = BlockLayout("float32", 2, 2, 64, 16)  # 32 KiB blocks


@pytest.fixture
def stored(tmp_path) -> Iterator[tuple[TieredStore, list, list[np.ndarray]]]:
    """A warm-only store holding 4 blocks of tenant ``acme``: (store, keys, raw bytes); closed at the end."""
    store = TieredStore(StoreConfig(data_dir=str(tmp_path), hot_device="off", cold_enabled=False))
    try:
        ns = Namespace("acme", "fill", "r1", LAYOUT)
        blocks = [torch.randn(LAYOUT.shape(16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
        res = store.put(ns, list(range(64)), blocks)
        yield store, res.keys, [b.view(torch.uint8).numpy().reshape(-1) for b in blocks]
    finally:
        store.close()


def _arena(size: int = 1 << 20) -> ServerArena:
    fd = create_memfd(size)
    try:
        return ServerArena("a" * 32, None, Arena(fd, size), os.getpid())
    finally:
        os.close(fd)


def test_fill_copies_every_block_byte_exact(stored):
    store, keys, raw = stored
    arena = _arena()
    out, missed, next_bytes = _fill(store, arena, (4096, 1 << 19), keys, "acme", None)
    assert (missed, next_bytes, len(out)) == (False, 0, 4)
    for (_key, block, tier, offset), want in zip(out, raw):
        assert tier == "warm" and offset % 4096 == 0
        assert np.array_equal(arena.arena.array[offset:offset + block.nbytes], want)
    # another tenant's blocks are misses, from the first one
    assert _fill(store, arena, (0, 1 << 19), keys, "other", None)[:2] == ([], True)


def test_fill_stops_at_a_block_whose_bytes_fail_their_checksum(stored):
    store, keys, _ = stored
    block, _tier = store.get(keys[2])
    block.data[100] ^= 1  # a bit flipped in the server's memory after the block was stored
    out, missed, next_bytes = _fill(store, _arena(), (0, 1 << 19), keys, "acme", None)
    assert [item[0] for item in out] == keys[:2] and missed and next_bytes == 0


def test_fill_says_how_big_the_block_that_did_not_fit_is(stored):
    store, keys, _ = stored
    out, missed, next_bytes = _fill(store, _arena(), (0, 3 * LAYOUT.block_bytes()), keys, "acme", None)
    assert len(out) == 3 and not missed and next_bytes == LAYOUT.block_bytes()
