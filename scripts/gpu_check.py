"""Measurements for a lent GPU machine: pinned→device vs pageable copies, and the store's warm→hot path.

Writes JSON to the path given (default stdout). Run by scripts/gpu_check.sh after the GPU tests.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

import torch

from tiering import BlockLayout, Namespace, StoreConfig, TieredStore


def _bw(fn, nbytes: int, reps: int) -> float:
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return nbytes * reps / (time.perf_counter() - t0) / 1e9


def copies() -> dict:
    out = {}
    for mib in (2, 64):
        n = mib << 20
        pageable = torch.empty(n, dtype=torch.uint8).random_(0, 255)
        pinned = pageable.pin_memory()
        dst = torch.empty(n, dtype=torch.uint8, device="cuda")
        out[f"{mib}MiB"] = {
            "pageable_to_cuda_GBps": _bw(lambda: pageable.to("cuda"), n, 20),
            "pinned_to_cuda_nonblocking_GBps": _bw(lambda: dst.copy_(pinned, non_blocking=True), n, 20),
        }
        out[f"{mib}MiB"]["pinned_over_pageable"] = (out[f"{mib}MiB"]["pinned_to_cuda_nonblocking_GBps"]
                                                    / out[f"{mib}MiB"]["pageable_to_cuda_GBps"])
    return out


def store_paths() -> dict:
    layout = BlockLayout("float16", 32, 8, 128, 16)  # a Llama-3-8B 16-token block: 2 MiB
    ns = Namespace("gpu", "llama-like", "bench", layout)
    nblocks = 128
    blocks = [torch.randn(layout.shape()).to(torch.float16) for _ in range(nblocks)]
    tokens = list(range(16 * nblocks))
    res = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = StoreConfig(data_dir=tmp, hot_device="cuda:0", hot_capacity=layout.block_bytes() * (nblocks + 8),
                          warm_capacity=layout.block_bytes() * (nblocks + 8), cold_capacity=4 << 30)
        with TieredStore(cfg) as store:
            store.put(ns, tokens, blocks, session_id="s", durable=True)
        with TieredStore(cfg) as store:
            t0 = time.perf_counter()
            _, _, h = store.resume("gpu", "s")
            h.future.result()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            res["cold_to_hot_GBps"] = layout.block_bytes() * nblocks / dt / 1e9
            # demote everything to warm, then time warm -> hot promotion
            keys = h.keys
            with store._lock:
                for k in keys:
                    b = store.memory[0].pop(k)
                    store.memory[1].put(k, store.memory[1].stage(b))
            t0 = time.perf_counter()
            for k in keys:
                store.get(k)
            torch.cuda.synchronize()
            res["warm_to_hot_GBps"] = layout.block_bytes() * nblocks / (time.perf_counter() - t0) / 1e9
            res["hot_tiers_after"] = store.lookup(ns, tokens).tiers.count("hot")
    return res


def _ipc_child(handles, results) -> None:
    from service.shm.cuda_ipc import import_copy
    for handle, reps in iter(handles.get, None):
        t0 = time.perf_counter()
        import_copy(handle)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for _ in range(reps):
            import_copy(handle)
        results.put((first, (time.perf_counter() - t0) / reps))


def cuda_ipc() -> dict:
    """A block handed to another process by CUDA IPC (open + device copy) vs a host round trip
    (device→host→device, what the shared-memory arena costs a CUDA client)."""
    import multiprocessing as mp

    from service.shm.cuda_ipc import export_handle
    ctx = mp.get_context("spawn")
    handles, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=(handles, results))
    child.start()
    out = {}
    try:
        for mib in (2, 64):
            n = mib << 20
            block = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
            handles.put((export_handle(block), 20))
            first, steady = results.get(timeout=300)
            host = _bw(lambda: block.cpu().to("cuda"), n, 20)
            out[f"{mib}MiB"] = {"ipc_first_open_ms": first * 1e3, "ipc_GBps": n / steady / 1e9,
                                "host_round_trip_GBps": host, "ipc_over_host": n / steady / 1e9 / host}
        handles.put(None)
        child.join(60)
    finally:
        if child.is_alive():
            child.kill()
    return out


def main() -> int:
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "copies": copies(), "store": store_paths()}
    try:
        result["cuda_ipc"] = cuda_ipc()
    except Exception as exc:  # the older measurements must come back even if IPC does not work here
        result["cuda_ipc"] = {"error": f"{type(exc).__name__}: {exc}"}
    text = json.dumps(result, indent=2)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            fh.write(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
