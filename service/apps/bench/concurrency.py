"""Scenario 5, concurrency: 1, 4, 16 and 32 async clients doing Get of a 360 KiB block at once.

Each client is an :class:`service.client.AsyncKVTierClient` with its own channel, all on one event loop
in this process, against a warm server subprocess holding 8 such blocks; once over the shared-memory
path (what a same-host caller gets by default) and once over the gRPC streams (``path``), then the same
levels against the bare ``grpc.aio`` echo server (``grpc_echo``: one channel per client, the same bytes per
Get, nothing else), the ceiling the issue-15 target compares the p99 with. Per level: aggregate GB/s
(bytes of every Get over the wall time of the level) and p50/p99 of single Gets as each client saw
them (client-side queueing included, which is what a caller waits for).
"""

from __future__ import annotations

import asyncio
import time

from kvtier.service.client.client import AsyncKVTierClient, KVTierClient

import grpc

from kvtier.service.apps.bench import echo, tiers
from kvtier.service.apps.bench.context import BenchContext, percentile
from kvtier.service.apps.bench.procs import echo_server, kvtier_server
from kvtier.service.apps.bench.transport import SIZES, namespace

LEVELS = (1, 4, 16, 32)


async def _level(address: str, keys: list, clients: int, ops: int, path: str) -> tuple[float, list[float]]:
    conns = [AsyncKVTierClient(address, timeout=120, data_path=path) for _ in range(clients)]
    try:
        await asyncio.gather(*(c.wait_ready(30) for c in conns))
        await asyncio.gather(*(c.get([keys[i % len(keys)]]) for i, c in enumerate(conns)))  # warm the channels
        lat: list[float] = []

        async def loop(ci: int, c: AsyncKVTierClient) -> None:
            for i in range(ops):
                t0 = time.perf_counter()
                got = await c.get([keys[(ci + i) % len(keys)]])
                lat.append(time.perf_counter() - t0)
                if not got.complete:
                    raise RuntimeError("a Get of a stored block came back incomplete")

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(i, c) for i, c in enumerate(conns)))
        return time.perf_counter() - t0, lat
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def _echo_level(address: str, size: int, clients: int, ops: int) -> tuple[float, list[float]]:
    """:func:`_level` against the bare echo server: ``clients`` channels, ``ops`` Gets of ``size`` bytes each."""
    chans = [grpc.aio.insecure_channel(address, options=[("grpc.max_receive_message_length", 8 << 20)])
             for _ in range(clients)]
    try:
        await asyncio.gather(*(echo.aio_get(c, size) for c in chans))  # connect and warm every channel
        lat: list[float] = []

        async def loop(c: grpc.aio.Channel) -> None:
            for _ in range(ops):
                t0 = time.perf_counter()
                got = await echo.aio_get(c, size)
                lat.append(time.perf_counter() - t0)
                if len(got) != size:
                    raise RuntimeError("the echo server answered a short Get")

        t0 = time.perf_counter()
        await asyncio.gather(*(loop(c) for c in chans))
        return time.perf_counter() - t0, lat
    finally:
        await asyncio.gather(*(c.close() for c in chans))


def _level_row(path: str, clients: int, size: int, wall: float, lat: list[float]) -> dict:
    return {"path": path, "clients": clients, "ops": len(lat), "block_bytes": size,
            "gbps": size * len(lat) / wall / 1e9, "ops_per_s": len(lat) / wall,
            "p50_ms": percentile(lat, 50) * 1e3, "p99_ms": percentile(lat, 99) * 1e3}


def run(ctx: BenchContext) -> dict:
    """Rows ``{path, clients, ops, gbps, ops_per_s, p50_ms, p99_ms}``."""
    layout = SIZES["360KiB"]
    ns = namespace(layout)
    data = tiers.payload(layout)
    size = data.nbytes
    levels = (1, 4) if ctx.tiny else LEVELS
    total = ctx.iterations(size, lo=64, hi=2000)
    rows = []
    with kvtier_server(ctx.workdir, "concurrency", ctx.workdir / "concurrency", store=tiers.SETTINGS["warm"]) as address:
        with KVTierClient(address, timeout=120) as client:
            client.wait_ready(30)
            keys = []
            for i in range(8):
                keys.append(client.put(ns, tiers.block_tokens(layout, i), [data]).keys[0])
        for path in ("shm", "grpc"):
            for clients in levels:
                ops = max(4 if not ctx.tiny else 2, total // clients)
                ctx.step(f"{clients} clients x {ops} Gets over {path}")
                wall, lat = asyncio.run(_level(address, keys, clients, ops, path))
                rows.append(_level_row(path, clients, size, wall, lat))
    with echo_server(ctx.workdir) as address:
        for clients in levels:
            ops = max(4 if not ctx.tiny else 2, total // clients)
            ctx.step(f"{clients} clients x {ops} Gets from the bare grpc.aio echo")
            rows.append(_level_row("grpc_echo", clients, size, *asyncio.run(_echo_level(address, size, clients, ops))))
    return {"rows": rows, "notes": ["warm server; clients share this process's event loop and its CPU "
                                    "with the server (2-core machines: client-side queueing is part of p99)"]}
