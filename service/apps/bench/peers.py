"""Reference points measured beside kvtier on the same bytes: what moving them could cost at best.

* ``memcpy``: one numpy copy of the block, the limit of any in-memory path (``memcpy_batch``: of
  ``blocks_per_call`` blocks at once, from a source larger than the caches, as a batched call moves them,
  mean over the calls; ``copyto_batch``: the same copy into an already-touched buffer, best of 5: the
  physical limit a batched Get is held to);
* ``grpc_echo``: the bare ``grpc.aio`` stream of :mod:`service.bench.echo` (same 1 MiB chunking), the
  ceiling of kvtier's transport;
* ``redis``: ``SET``/``GET`` through redis-py against a local ``redis-server`` without persistence, the
  usual "just put it in Redis" alternative (skipped with a note when redis-server is missing);
  ``redis_batch``: ``blocks_per_call`` blocks per round trip (pipelined ``SET``s, one ``MGET``);
* ``lmdb_zstd``: a raw LMDB get of the record the cold tier would write, then zstd decompression of its
  payload (no unshuffle, no checksum), the ceiling of the cold tier; ``zstd``: the decompression alone.

Each function returns rows ``{"path", "op", "block_bytes", "n", "gbps", "p50_ms", "p99_ms", ...}``.
"""

from __future__ import annotations

import os
from pathlib import Path

import grpc
import lmdb
import numpy as np
import zstandard

from kvtier.tiering.codec import HEADER, Codec, CodecId
from kvtier.tiering.layout import itemsize

from kvtier.service.apps.bench import echo
from kvtier.service.apps.bench.context import BenchContext, summarize, time_ops
from kvtier.service.apps.bench.procs import echo_server, redis_binary, redis_server


def _row(path: str, op: str, size: int, lat: list[float], tier: str = "-", **extra) -> dict:
    return {"path": path, "tier": tier, "op": op, "block_bytes": size, **summarize(lat, size), **extra}


def batch_row(path: str, op: str, size: int, blocks: int, lat: list[float], tier: str = "-") -> dict:
    """A row of calls moving ``blocks`` blocks of ``size`` bytes each: ``gbps`` over all their bytes,
    latencies per call."""
    return {"path": path, "tier": tier, "op": op, "block_bytes": size, "blocks_per_call": blocks,
            **summarize(lat, size * blocks)}


def memcpy_batch_rows(payload: np.ndarray, blocks: int, n: int) -> list[dict]:
    """numpy copy of ``blocks`` copies of ``payload`` laid end to end into a preallocated buffer (both
    larger than the caches, as the blocks of a batched call are), counted as both put and get."""
    src = np.tile(payload, blocks)
    dst = np.empty_like(src)
    lat = time_ops(lambda i: np.copyto(dst, src), n, warmup=2)
    return [batch_row("memcpy_batch", op, payload.nbytes, blocks, lat) for op in ("put", "get")]


def copyto_batch_rows(payload: np.ndarray, blocks: int, tries: int = 5) -> list[dict]:
    """The physical limit of a batched Get: ONE ``np.copyto`` of ``blocks`` copies of ``payload`` into a
    buffer already written once (its pages are mapped, as a client's arena is), best of ``tries``."""
    src = np.tile(payload, blocks)
    dst = np.empty_like(src)
    dst.fill(0)  # touch every page before timing
    best = min(time_ops(lambda i: np.copyto(dst, src), tries, warmup=1))
    return [{**batch_row("copyto_batch", "get", payload.nbytes, blocks, [best]), "best_of": tries}]


def memcpy_rows(payload: np.ndarray, n: int) -> list[dict]:
    """numpy copy of ``payload`` into a preallocated buffer (counted as both put and get)."""
    dst = np.empty_like(payload)
    lat = time_ops(lambda i: np.copyto(dst, payload), n, warmup=2)
    return [_row("memcpy", op, payload.nbytes, lat) for op in ("put", "get")]


def echo_rows(ctx: BenchContext, payloads: dict[int, np.ndarray]) -> list[dict]:
    """Put and Get of every payload size through the bare echo server (one server for all sizes)."""
    rows = []
    with echo_server(ctx.workdir) as address, grpc.insecure_channel(address, options=[
            ("grpc.max_receive_message_length", 8 << 20)]) as channel:
        for size, payload in payloads.items():
            n = ctx.iterations(size)
            view = memoryview(payload).cast("B")
            lat = time_ops(lambda i: echo.sync_put(channel, view), n)
            rows.append(_row("grpc_echo", "put", size, lat))
            lat = time_ops(lambda i: echo.sync_get(channel, size), n)
            rows.append(_row("grpc_echo", "get", size, lat))
    return rows


def redis_rows(ctx: BenchContext, payloads: dict[int, np.ndarray], notes: list[str]) -> list[dict]:
    """SET/GET of every payload size; ``[]`` plus a note when redis-server or redis-py is missing."""
    if redis_binary() is None:
        notes.append("redis: skipped, redis-server not installed (apt-get install -y redis-server)")
        return []
    try:
        import redis
    except ImportError:
        notes.append("redis: skipped, redis-py not installed (pip install 'kvtier[bench]')")
        return []
    rows = []
    try:
        with redis_server(ctx.workdir) as port:
            client = redis.Redis(host="127.0.0.1", port=port)
            try:
                for size, payload in payloads.items():
                    n = ctx.iterations(size)
                    data = payload.tobytes()
                    lat = time_ops(lambda i: client.set(f"b{i % 8}", data), n)
                    rows.append(_row("redis", "put", size, lat))
                    got = client.get("b0")
                    if got != data:
                        notes.append("redis: GET returned different bytes")
                    lat = time_ops(lambda i: client.get(f"b{i % 8}"), n)
                    rows.append(_row("redis", "get", size, lat))
            finally:
                client.close()
    except Exception as exc:  # a broken Redis must cost its rows, never the run
        notes.append(f"redis: skipped after an error: {type(exc).__name__}: {exc}")
    return rows


def redis_batch_rows(ctx: BenchContext, payload: np.ndarray, blocks: int, n: int, notes: list[str]) -> list[dict]:
    """``blocks`` blocks per round trip: a pipeline of SETs, then one MGET (``[]`` without Redis)."""
    if redis_binary() is None:
        return []
    try:
        import redis
    except ImportError:
        return []
    rows = []
    data = payload.tobytes()
    names = [f"batch{j}" for j in range(blocks)]

    def put(_i: int) -> None:
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.set(name, data)
        pipe.execute()

    try:
        with redis_server(ctx.workdir) as port:
            client = redis.Redis(host="127.0.0.1", port=port)
            try:
                rows.append(batch_row("redis_batch", "put", payload.nbytes, blocks, time_ops(put, n)))
                if any(got != data for got in client.mget(names)):
                    notes.append("redis: MGET returned different bytes")
                lat = time_ops(lambda i: client.mget(names), n)
                rows.append(batch_row("redis_batch", "get", payload.nbytes, blocks, lat))
            finally:
                client.close()
    except Exception as exc:  # a broken Redis must cost its rows, never the run
        notes.append(f"redis batch: skipped after an error: {type(exc).__name__}: {exc}")
    return rows


def cold_ceiling_rows(ctx: BenchContext, payloads: dict[int, np.ndarray], dtype: str, codec: Codec) -> list[dict]:
    """Raw LMDB get + zstd decompress of the cold tier's records, and zstd decompress alone.

    :param dtype: element type the payloads hold (the records are encoded as the cold tier would).
    """
    rows = []
    path = Path(ctx.workdir) / "lmdb-ceiling"
    os.makedirs(path, exist_ok=True)
    env = lmdb.open(str(path), map_size=4 << 30, sync=False, metasync=False, readahead=False)
    dctx = zstandard.ZstdDecompressor()
    try:
        for size, payload in payloads.items():
            elems = size // itemsize(dtype)
            record = codec.encode(memoryview(payload).cast("B"), dtype, (2, 1, 1, 1, elems // 2))
            keys = [os.urandom(16) for _ in range(8)]
            with env.begin(write=True) as txn:
                for k in keys:
                    txn.put(k, record)
            n = ctx.iterations(size)

            def lmdb_get(i: int) -> None:
                with env.begin() as txn:
                    rec = txn.get(keys[i % 8])
                dctx.decompress(memoryview(rec)[HEADER.size:], max_output_size=size)

            lat = time_ops(lmdb_get, n)
            rows.append(_row("lmdb_zstd", "get", size, lat, tier="cold",
                             compression_ratio=size / len(record)))
            body = record[HEADER.size:]
            if codec.codec is CodecId.RAW:
                lat = time_ops(lambda i: bytes(body), n)
            else:
                lat = time_ops(lambda i: dctx.decompress(body, max_output_size=size), n)
            rows.append(_row("zstd", "get", size, lat, tier="cold"))
    finally:
        env.close()
    return rows
