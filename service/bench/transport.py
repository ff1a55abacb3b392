"""Scenario 1, transport and tiers: Put/Get GB/s and p50/p99 per block size, tier and path.

Block sizes: 360 KiB (SmolLM2 16-token fp16, ``float16:30x3x64/16``), 2 MiB (Llama-3-8B 16-token
fp16, ``float16:32x8x128/16``) and 8 MiB (``float16:32x8x128/64``). Paths, one after another on the
same bytes: ``grpc`` (a real server subprocess and :class:`service.client.KVTierClient`), ``engine``
(:class:`tiering.store.TieredStore` in this process), and the reference points of
:mod:`service.bench.peers`. Tiers per :mod:`service.bench.tiers` (hot only with CUDA). A cold Put is
durable (returns once committed to LMDB, fsync off); a Get cycles over 8 stored blocks.
"""

from __future__ import annotations

import torch

from service.client import KVTierClient
from service.convert import DEFAULT_TENANT
from tiering.codec import Codec, CodecId
from tiering.keys import BlockKey, Namespace, chain_keys
from tiering.layout import BlockLayout
from tiering.store import TieredStore

from . import peers, tiers
from .context import BenchContext, ratio, summarize, time_ops
from .procs import kvtier_server

SIZES: dict[str, BlockLayout] = {
    "360KiB": BlockLayout("float16", 30, 3, 64, 16),
    "2MiB": BlockLayout("float16", 32, 8, 128, 16),
    "8MiB": BlockLayout("float16", 32, 8, 128, 64),
}
GET_POOL = 8
#: Blocks per call of the batched shared-memory rows.
SHM_BATCH = 16


def namespace(layout: BlockLayout) -> Namespace:
    return Namespace(DEFAULT_TENANT, "kvtier-bench/transport", "r1", layout)


def _row(path: str, tier: str, op: str, size: int, lat: list[float]) -> dict:
    return {"path": path, "tier": tier, "op": op, "block_bytes": size, **summarize(lat, size)}


def _measure(ctx: BenchContext, path: str, tier: str, put, get, notes: list[str]) -> list[dict]:
    """Time ``put(ns, tokens, payload, durable)`` then ``get(key) -> bytes-like`` for every size."""
    rows = []
    durable = tier == "cold"
    for label, layout in _sizes(ctx).items():
        ns = namespace(layout)
        data = tiers.payload(layout)
        size = data.nbytes
        n = ctx.iterations(size)
        ctx.step(f"{path} {tier} put {label} x{n}")
        lat = time_ops(lambda i: put(ns, tiers.block_tokens(layout, i), data, durable), n)
        rows.append(_row(path, tier, "put", size, lat))
        keys = [chain_keys(ns, tiers.block_tokens(layout, i))[0] for i in range(min(GET_POOL, n + 1))]
        got = get(keys[0])
        if got is None or got.tobytes() != data.tobytes():
            notes.append(f"{path}/{tier}/{label}: Get returned different bytes than were put")
        ctx.step(f"{path} {tier} get {label} x{n}")
        lat = time_ops(lambda i: get(keys[i % len(keys)]), n)
        rows.append(_row(path, tier, "get", size, lat))
    return rows


def _sizes(ctx: BenchContext) -> dict[str, BlockLayout]:
    return {"360KiB": SIZES["360KiB"]} if ctx.tiny else SIZES


def grpc_rows(ctx: BenchContext, tier: str, notes: list[str]) -> list[dict]:
    """kvtier's gRPC path against a fresh server of ``tier``."""
    with kvtier_server(ctx.workdir, f"transport-{tier}", ctx.workdir / f"transport-grpc-{tier}",
                       store=tiers.SETTINGS[tier]) as address, KVTierClient(address, timeout=120,
                                                                            data_path="grpc") as client:
        client.wait_ready(30)

        def put(ns, tokens, data, durable):
            client.put(ns, tokens, [data], durable=durable)

        def get(key: BlockKey):
            res = client.get([key])
            return res.blocks[0].reshape(-1).view(torch.uint8).numpy() if res.blocks else None

        return _measure(ctx, "grpc", tier, put, get, notes)


def shm_rows(ctx: BenchContext, notes: list[str]) -> list[dict]:
    """kvtier's same-host path (``data_path="shm"``, service/shm) against a fresh warm server: one block
    per call (``shm``), and ``SHM_BATCH`` blocks per call (``shm_batch``, per-block latency)."""
    with kvtier_server(ctx.workdir, "transport-shm", ctx.workdir / "transport-shm-warm",
                       store=tiers.SETTINGS["warm"]) as address, \
            KVTierClient(address, timeout=120, data_path="shm") as client:
        client.wait_ready(30)

        def put(ns, tokens, data, durable):
            client.put(ns, tokens, [data], durable=durable)

        def get(key: BlockKey):
            res = client.get([key])
            return res.blocks[0].reshape(-1).view(torch.uint8).numpy() if res.blocks else None

        rows = _measure(ctx, "shm", "warm", put, get, notes)
        layout = SIZES["2MiB"] if not ctx.tiny else SIZES["360KiB"]
        ns = namespace(layout)
        data = tiers.payload(layout, seed=1)
        tokens = [t for i in range(SHM_BATCH) for t in tiers.block_tokens(layout, 1000 + i)]
        n = max(3, ctx.iterations(data.nbytes * SHM_BATCH, lo=3, hi=20))
        ctx.step(f"shm warm batched put/get {SHM_BATCH} x {data.nbytes >> 10} KiB x{n}")
        lat = time_ops(lambda i: client.put(ns, tokens, [data] * SHM_BATCH, first_block=0), n)
        rows.append(_row("shm_batch", "warm", "put", data.nbytes, [t / SHM_BATCH for t in lat]))
        keys = chain_keys(ns, tokens)
        lat = time_ops(lambda i: client.get(keys), n)
        rows.append(_row("shm_batch", "warm", "get", data.nbytes, [t / SHM_BATCH for t in lat]))
    notes.append(f"shm: shared-memory data path on a warm server; shm_batch: {SHM_BATCH} blocks per call, "
                 "latency per block (a batched put re-sends present blocks: they are deduplicated)")
    return rows


def resume_rows(ctx: BenchContext, notes: list[str]) -> list[dict]:
    """restore_cache of a SmolLM2 session (2048 tokens; 512 quick, 64 tiny) over shm vs gRPC streams."""
    from service.hf import namespace_for, restore_cache, save_cache

    from .model import conversation, get_model, prefill
    n = 64 if ctx.tiny else 512 if ctx.quick else 2048
    bm = get_model(ctx)
    ns = namespace_for(bm.model, fingerprint=bm.fingerprint)
    ids = conversation(bm, n)
    cache = prefill(bm, ids)[0]
    rows = []
    with kvtier_server(ctx.workdir, "transport-resume", ctx.workdir / "transport-resume",
                       store=tiers.SETTINGS["warm"]) as address:
        with KVTierClient(address, timeout=300, data_path="grpc") as client:
            save_cache(client, ns, "resume", ids, cache)
        for path in ("shm", "grpc"):
            with KVTierClient(address, timeout=300, data_path=path) as client:
                ctx.step(f"restore {n} tokens over {path}")
                lat = time_ops(lambda i: restore_cache(client, "resume", ids + [1], namespace=ns), 3 if ctx.tiny else 5)
                rows.append({**_row(f"resume_{path}", "warm", "restore", ns.layout.block_bytes(1) * n, lat),
                             "tokens": n})
    notes.append(f"resume_*: restore_cache of a {n}-token {bm.name} session (Resume + Get + DynamicCache)")
    return rows


def engine_rows(ctx: BenchContext, tier: str, notes: list[str]) -> list[dict]:
    """The engine in this process, same configuration as the server."""
    store = TieredStore(tiers.store_config(tier, ctx.workdir / f"transport-engine-{tier}"))
    try:
        def put(ns, tokens, data, durable):
            store.put(ns, tokens, [data], durable=durable)

        def get(key: BlockKey):
            got = store.get(key)
            return None if got is None else got[0].data.cpu().numpy()

        return _measure(ctx, "engine", tier, put, get, notes)
    finally:
        store.close()


def shm_ratios(rows: list[dict]) -> list[str]:
    """Notes comparing the 2 MiB shm rows with memcpy, Redis and the gRPC streams (targets: Get ≥ 0.5x
    memcpy and ≥ 5x Redis, Put ≥ 0.4x memcpy), and the shm/gRPC resume speedup."""
    def gbps(path, op, size=SIZES["2MiB"].block_bytes()):
        return next((r["gbps"] for r in rows if r["path"] == path and r["op"] == op and r["block_bytes"] == size
                     and r["tier"] in ("warm", "-")), None)

    out = []
    for path in ("shm", "shm_batch"):
        for op in ("get", "put"):
            parts = [f"{ref} {r:.2f}x" for ref in ("memcpy", "redis", "grpc")
                     if (r := ratio(gbps(path, op), gbps(ref, op))) is not None]
            if parts:
                out.append(f"{path} {op} 2 MiB warm vs " + ", ".join(parts))
    rs = {r["path"]: r["p50_ms"] for r in rows if r["path"].startswith("resume_")}
    if (r := ratio(rs.get("resume_grpc"), rs.get("resume_shm"))) is not None:
        out.append(f"resume over shm is {r:.2f}x faster than over gRPC streams (p50)")
    return out


def run(ctx: BenchContext) -> dict:
    """Rows ``{path, tier, op, block_bytes, n, gbps, p50_ms, p99_ms, mean_ms}`` for every path."""
    notes: list[str] = []
    rows: list[dict] = []
    for tier in tiers.available():
        rows += grpc_rows(ctx, tier, notes)
        rows += engine_rows(ctx, tier, notes)
    payloads = {layout.block_bytes(): tiers.payload(layout) for layout in _sizes(ctx).values()}
    ctx.step("memcpy")
    for size, data in payloads.items():
        rows += peers.memcpy_rows(data, ctx.iterations(size, hi=2000))
    ctx.step("bare grpc.aio echo")
    rows += peers.echo_rows(ctx, payloads)
    ctx.step("redis")
    rows += peers.redis_rows(ctx, payloads, notes)
    rows += shm_rows(ctx, notes)
    rows += resume_rows(ctx, notes)
    notes += shm_ratios(rows)
    ctx.step("raw LMDB get + zstd")
    default = tiers.store_config("cold", ctx.workdir / "unused")
    codec = Codec(default.zstd_level, {"shuffle_zstd": CodecId.SHUFFLE_ZSTD, "zstd": CodecId.ZSTD,
                                       "raw": CodecId.RAW}[default.codec])
    rows += peers.cold_ceiling_rows(ctx, payloads, "float16", codec)
    if "hot" not in tiers.available():
        notes.append("hot tier not measured: no CUDA device")
    notes.append("cold: memory tiers off, Put durable (fsync off), Get = LMDB read + decode every time")
    return {"rows": rows, "notes": notes}
