"""kvtier.service.server.shm_rpc._fill in-process: the server answers only blocks whose bytes in the arena match their
checksum, on a real store and a real memfd arena (no gRPC: the corruption is planted in the warm tier,
which no client can reach)."""

from __future__ import annotations

import os

import numpy as np
import torch

from kvtier.service.wire.arena import Arena, create_memfd
from kvtier.service.server.shm_broker import ServerArena
from kvtier.service.server.shm_rpc import _fill
from kvtier.tiering.config import StoreConfig
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.store import TieredStore

LAYOUT = BlockLayout("float32", 2, 2, 64, 16)  # 32 KiB blocks


def _store(tmp_path) -> tuple[TieredStore, list, list[np.ndarray]]:
    store = TieredStore(StoreConfig(data_dir=str(tmp_path), hot_device="off", cold_enabled=False))
    ns = Namespace("acme", "fill", "r1", LAYOUT)
    blocks = [torch.randn(LAYOUT.shape(16), generator=torch.Generator().manual_seed(i)) for i in range(4)]
    res = store.put(ns, list(range(64)), blocks)
    return store, res.keys, [b.view(torch.uint8).numpy().reshape(-1) for b in blocks]


def _arena(size: int = 1 << 20) -> ServerArena:
    fd = create_memfd(size)
    try:
        return ServerArena("a" * 32, None, Arena(fd, size), os.getpid())
    finally:
        os.close(fd)


def test_fill_copies_every_block_byte_exact(tmp_path):
    store, keys, raw = _store(tmp_path)
    arena = _arena()
    try:
        out, missed, next_bytes = _fill(store, arena, (4096, 1 << 19), keys, "acme", None)
        assert (missed, next_bytes, len(out)) == (False, 0, 4)
        for (_key, block, tier, offset), want in zip(out, raw):
            assert tier == "warm" and offset % 4096 == 0
            assert np.array_equal(arena.arena.array[offset:offset + block.nbytes], want)
        # another tenant's blocks are misses, from the first one
        assert _fill(store, arena, (0, 1 << 19), keys, "other", None)[:2] == ([], True)
    finally:
        store.close()


def test_fill_stops_at_a_block_whose_bytes_fail_their_checksum(tmp_path):
    store, keys, _ = _store(tmp_path)
    arena = _arena()
    try:
        block, _tier = store.get(keys[2])
        block.data[100] ^= 1  # a bit flipped in the server's memory after the block was stored
        out, missed, next_bytes = _fill(store, arena, (0, 1 << 19), keys, "acme", None)
        assert [item[0] for item in out] == keys[:2] and missed and next_bytes == 0
    finally:
        store.close()


def test_fill_says_how_big_the_block_that_did_not_fit_is(tmp_path):
    store, keys, _ = _store(tmp_path)
    arena = _arena()
    try:
        out, missed, next_bytes = _fill(store, arena, (0, 3 * LAYOUT.block_bytes()), keys, "acme", None)
        assert len(out) == 3 and not missed and next_bytes == LAYOUT.block_bytes()
    finally:
        store.close()
