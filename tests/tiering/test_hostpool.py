"""HostPool: regions recycle only once every view of them is garbage, the reserve is faulted in ahead,
the limit holds, and a store's puts land in pooled memory that round-trips bit for bit."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch

from kvtier.tiering.config import StoreConfig
from kvtier.tiering.hostpool import CHUNK_BYTES, MIN_BYTES, HostPool
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.store import TieredStore

N = 2 << 20


def _wait(cond, timeout=10.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


def test_a_region_is_reused_only_after_every_view_of_it_died():
    pool = HostPool(1 << 30)
    a = pool.take(N)
    a[:] = 7
    tensor = torch.from_numpy(a)[100:200]  # a view through torch keeps the region
    sub = a[4:10].view(np.uint16)  # and a numpy view of a view
    addr = a.ctypes.data
    del a
    gc.collect()
    b = pool.take(N)
    assert b.ctypes.data != addr, "a region still viewed was handed out again"
    b[:] = 9
    assert int(tensor.min()) == 7 and int(tensor.max()) == 7 and int(sub[0]) == 0x0707
    del tensor
    gc.collect()
    c = pool.take(N)
    assert c.ctypes.data != addr, "the numpy view still holds the region"
    del sub
    gc.collect()
    d = pool.take(N)
    assert d.ctypes.data == addr
    assert pool.stats()["pool_recycled"] == 1


def test_size_classes_do_not_mix_and_small_blocks_bypass_the_pool():
    pool = HostPool(1 << 30)
    small = pool.take(MIN_BYTES - 1)
    assert small.base is None  # np.empty owns its memory
    a = pool.take(N)
    addr = a.ctypes.data
    del a
    gc.collect()
    other = pool.take(N + 8192)  # another size class: not the freed 2 MiB region
    assert other.ctypes.data != addr
    again = pool.take(N - 100)  # same class once rounded up to pages
    assert again.ctypes.data == addr and again.nbytes == N - 100


def test_the_limit_falls_back_to_np_empty_and_zero_disables():
    pool = HostPool(CHUNK_BYTES)
    held = [pool.take(N) for _ in range(CHUNK_BYTES // N)]
    extra = pool.take(N)
    assert extra.base is None and pool.stats()["pool_fallbacks"] == 1
    assert pool.stats()["pool_mapped_bytes"] == CHUNK_BYTES
    off = HostPool(0, 1 << 30)
    assert off.take(N).base is None and off.reserve == 0
    del held


def test_the_reserve_is_faulted_in_ahead_and_refilled():
    pool = HostPool(1 << 30, reserve=2 * CHUNK_BYTES)
    try:
        _wait(lambda: pool.stats().get("pool_prefaulted_bytes", 0) >= 2 * CHUNK_BYTES)
        held = [pool.take(N) for _ in range(3 * CHUNK_BYTES // N // 2)]  # 1.5 chunks: below half the reserve
        _wait(lambda: pool.stats()["pool_prefaulted_bytes"] >= 3 * CHUNK_BYTES)
        for i, h in enumerate(held):
            h[:] = i % 251
        assert all(int(h[0]) == i % 251 and int(h[-1]) == i % 251 for i, h in enumerate(held))
    finally:
        pool.close()


def test_concurrent_takes_and_frees_never_share_a_region():
    pool = HostPool(1 << 30, reserve=CHUNK_BYTES)
    errors = []

    def worker(seed: int) -> None:
        for i in range(40):
            a = pool.take(N)
            a[:] = seed
            time.sleep(0.0005)
            if int(a.min()) != seed or int(a.max()) != seed:
                errors.append((seed, i))
            del a

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(1, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pool.close()
    assert not errors
    assert pool.stats()["pool_recycled"] > 0


def test_store_puts_use_the_pool_and_round_trip(tmp_path):
    ns = Namespace("t", "m", "r", BlockLayout("float16", 4, 2, 64, 256))  # 512 KiB blocks
    cfg = StoreConfig(data_dir=str(tmp_path), hot_device="off", warm_capacity=64 << 20, warm_reserve=CHUNK_BYTES,
                      cold_enabled=False)
    with TieredStore(cfg) as store:
        blocks = [torch.randn(ns.layout.shape(256)).half() for _ in range(8)]
        tokens = list(range(8 * 256))
        res = store.put(ns, tokens, blocks)
        assert len(res.stored) == 8
        for key, want in zip(res.keys, blocks):
            got = store.get(key)[0].data
            assert torch.equal(got.view(torch.float16).reshape(want.shape), want)
        snap = store.snapshot()
        assert snap["pool_carved"] + snap.get("pool_recycled", 0) == 8
        # evicting every block gives the regions back for the next puts
        more = [torch.randn(ns.layout.shape(256)).half() for _ in range(200)]
        store.put(ns, list(range(10**6, 10**6 + 200 * 256)), more)
        gc.collect()
        assert store.snapshot()["pool_mapped_bytes"] <= cfg.warm_capacity + cfg.warm_reserve + 2 * CHUNK_BYTES


@pytest.mark.parametrize("reserve", ["-1"])
def test_a_negative_reserve_is_refused(tmp_path, reserve):
    with pytest.raises(ValueError, match="warm_reserve"):
        StoreConfig(data_dir=str(tmp_path), warm_reserve=int(reserve)).validate()


def test_an_owned_pool_array_is_kept_without_a_copy_and_a_borrowed_one_is_copied(tmp_path):
    ns = Namespace("t", "m", "r", BlockLayout("float16", 4, 2, 64, 256))
    cfg = StoreConfig(data_dir=str(tmp_path), hot_device="off", warm_capacity=64 << 20, cold_enabled=False)
    with TieredStore(cfg) as store:
        n = ns.layout.block_bytes(256)
        mine, lent = store.hostpool.take(n), store.hostpool.take(n)
        mine[:] = np.arange(n, dtype=np.uint64).astype(np.uint8)
        lent[:] = 3
        a = store.put(ns, list(range(256)), [mine], owned=True).keys[0]
        b = store.put(ns, list(range(1000, 1256)), [lent]).keys[0]
        assert store.get(a)[0].data.numpy().ctypes.data == mine.ctypes.data
        kept = store.get(b)[0].data.numpy()
        assert kept.ctypes.data != lent.ctypes.data
        lent[:] = 4  # the caller reuses its buffer: the stored block does not change
        assert int(kept.max()) == 3
