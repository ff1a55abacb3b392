"""Measurements for a lent GPU machine: pinned→device vs pageable copies, the store's warm→hot path,
CUDA IPC of one buffer, and a Get of hot blocks through the RPCs by CUDA IPC vs the shared-memory arena.

Writes JSON to the path given (default stdout). Run by scripts/gpu_check.sh after the GPU tests; exits
with status 2 and a message when torch sees no CUDA device.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore


def _bw(fn, nbytes: int, reps: int) -> float:
    return nbytes / _timed(fn, reps) / 1e9


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
    from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
    from kvtier.service.wire.cuda_ipc import copy_out

    def copy(raw: bytes) -> None:
        buf = pb.CudaIpcBuffer.FromString(raw)
        copy_out(buf, "cuda:0", [(0, buf.size_bytes)])

    for first_handle, handles_then in iter(handles.get, None):
        t0 = time.perf_counter()
        copy(first_handle)
        first = time.perf_counter() - t0
        t0 = time.perf_counter()
        for raw in handles_then:
            copy(raw)
        results.put((first, (time.perf_counter() - t0) / len(handles_then)))


def cuda_ipc() -> dict:
    """A block handed to another process by CUDA IPC (open + device copy) vs a host round trip
    (device→host→device, what the shared-memory arena costs a CUDA client)."""
    import multiprocessing as mp

    from kvtier.service.wire.cuda_ipc import share
    ctx = mp.get_context("spawn")
    handles, results = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_ipc_child, args=(handles, results))
    child.start()
    out = {}
    try:
        for mib in (2, 64):
            n = mib << 20
            block = torch.empty(n, dtype=torch.uint8, device="cuda").random_(0, 255)
            # one share per open: each carries the one reference its reader gives back
            handles.put((share(block).SerializeToString(), [share(block).SerializeToString() for _ in range(20)]))
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


def _timed(fn, reps: int) -> float:
    """Seconds per call of ``fn`` (after one warm-up call), the GPU's work included."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def rpc_get(reps: int = 10) -> dict:
    """A Get of hot blocks (2 MiB each) to a CUDA client on the server's GPU, through the RPCs:
    ``get(keys, device="cuda:0")`` (GetIpc: one device-to-device copy on each side) vs ``get(keys)``
    through the shared-memory arena then ``.to("cuda")`` (device→host in the server, host→device here)."""
    from kvtier.service.apps.bench.procs import kvtier_server
    from kvtier.service.client.client import KVTierClient

    layout = BlockLayout("float16", 32, 8, 128, 16)
    ns = Namespace("default", "gpu-check", "ipc", layout)
    n = 32
    blocks = [torch.randn(layout.shape()).to(torch.float16) for _ in range(n)]
    out = {}
    with tempfile.TemporaryDirectory() as tmp, \
            kvtier_server(Path(tmp), "ipc", Path(tmp) / "data",
                          store={"hot_device": "cuda:0", "hot_capacity": "1GiB", "warm_capacity": "1GiB"}) as target, \
            KVTierClient(target, data_path="shm") as kv:
        keys = kv.put(ns, list(range(16 * n)), blocks).keys
        out["hot_blocks"] = kv.lookup(ns, list(range(16 * n))).tiers.count("hot")
        for mib in (16, 64):
            chain = keys[:mib * n // 64]
            by_ipc = kv.get(chain, device="cuda:0").blocks
            by_host = [b.to("cuda") for b in kv.get(chain).blocks]
            same = all(torch.equal(a.view(torch.uint8), b.view(torch.uint8)) for a, b in zip(by_ipc, by_host))
            before = kv.stats().counters.get("ipc_blocks", 0)
            ipc_s = _timed(lambda: kv.get(chain, device="cuda:0"), reps)
            ipc_blocks = (kv.stats().counters.get("ipc_blocks", 0) - before) / (reps + 1)
            host_s = _timed(lambda: [b.to("cuda") for b in kv.get(chain).blocks], reps)
            nbytes = mib << 20
            out[f"{mib}MiB"] = {"blocks": len(chain), "blocks_by_ipc_per_get": ipc_blocks, "bit_identical": same,
                                "ipc_ms": ipc_s * 1e3, "ipc_GBps": nbytes / ipc_s / 1e9,
                                "shm_then_to_cuda_ms": host_s * 1e3, "shm_then_to_cuda_GBps": nbytes / host_s / 1e9,
                                "ipc_over_host": host_s / ipc_s}
    return out


def main() -> int:
    if not torch.cuda.is_available():
        sys.stderr.write("gpu_check: torch sees no CUDA device; run it on a GPU machine (scripts/gpu_check.sh)\n")
        return 2
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
              "copies": copies(), "store": store_paths()}
    # the older measurements must come back even if IPC does not work here
    for name, measure in (("cuda_ipc", cuda_ipc), ("rpc_get", rpc_get)):
        try:
            result[name] = measure()
        except Exception as exc:
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
    text = json.dumps(result, indent=2)
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w") as fh:
            fh.write(text)
    sys.stdout.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
