"""Scenario 1, transport and tiers: Put/Get GB/s and p50/p99 per block size, tier and path.

Block sizes: 360 KiB (SmolLM2 16-token fp16, ``float16:30x3x64/16``), 2 MiB (Llama-3-8B 16-token
fp16, ``float16:32x8x128/16``) and 8 MiB (``float16:32x8x128/64``). Paths, one after another on the
same bytes: ``grpc`` (a real server subprocess and :class:`service.client.KVTierClient`), ``engine``
(:class:`tiering.store.TieredStore` in this process), and the reference points of
:mod:`service.bench.peers`. Tiers per :mod:`service.bench.tiers` (hot only with CUDA). A cold Put is
durable (returns once committed to LMDB, fsync off); a Get cycles over 8 stored blocks.
"""

from __future__ import annotations

import numpy as np
import torch

from kvtier.service.client.client import KVTierClient
from kvtier.service.wire.convert import DEFAULT_TENANT
from kvtier.tiering.bytecopy import spread
from kvtier.tiering.codec import Codec, CodecId
from kvtier.tiering.keys import BlockKey, Namespace, chain_keys
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.store import TieredStore

from kvtier.service.apps.bench import peers, tiers
from kvtier.service.apps.bench.context import BenchContext, ratio, summarize, time_ops
from kvtier.service.apps.bench.peers import batch_row
from kvtier.service.apps.bench.procs import kvtier_server

SIZES: dict[str, BlockLayout] = {
    "360KiB": BlockLayout("float16", 30, 3, 64, 16),
    "2MiB": BlockLayout("float16", 32, 8, 128, 16),
    "8MiB": BlockLayout("float16", 32, 8, 128, 64),
}
GET_POOL = 8
#: Blocks (2 MiB) per call of the batched shared-memory rows: a 256- and a 1024-token Llama-3-8B turn.
SHM_BATCHES = (16, 64)
#: The shared-memory server: memory only, a warm tier small enough that the timed puts recycle evicted
#: blocks' memory (the steady state of a full cache) rather than fault in fresh pages.
SHM_WARM_BYTES = 768 << 20
SHM_SETTINGS = {**tiers.SETTINGS["warm"], "warm_capacity": str(SHM_WARM_BYTES), "cold_enabled": "false"}


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


def _client_ops(client: KVTierClient):
    """``(put, get)`` of one block each through ``client``, as :func:`_measure` calls them."""
    def put(ns, tokens, data, durable):
        client.put(ns, tokens, [data], durable=durable)

    def get(key: BlockKey):
        res = client.get([key])
        return res.blocks[0].reshape(-1).view(torch.uint8).numpy() if res.blocks else None

    return put, get


def put_via_buffers(client: KVTierClient, ns: Namespace, tokens: np.ndarray, payloads: list[np.ndarray], **kwargs):
    """Put ``payloads`` (one per block of ``tokens``) as a caller that produces its blocks into the
    client's leased buffers does: lease them (``block_buffers``), write each payload into its buffer
    (the producer's one copy, timed with the store by the caller), put them (over shared memory they
    are named in place: no second copy, no client checksum)."""
    bufs = client.block_buffers(ns, len(tokens))
    pairs = [(buf.reshape(-1).view(torch.uint8).numpy(), data.reshape(-1).view(np.uint8))
             for buf, data in zip(bufs, payloads, strict=True)]
    # spread over the copy threads as the client's own copy was (a producer writes with its threads too)
    spread(lambda pair: np.copyto(*pair), pairs, sum(d.nbytes for _, d in pairs))
    return client.put(ns, tokens, bufs, **kwargs)


def fill_warm(client: KVTierClient, nbytes: int, blocks: int = 8) -> None:
    """Put ``nbytes`` of fresh 2 MiB blocks (``blocks`` per call, through leased buffers), so that a warm
    tier of at most ``nbytes`` is full and later puts reuse evicted blocks' memory: the steady state of
    a cache in use, where a Redis SET overwrites a key and LMCache's L1 was first-touched up front,
    rather than the first minutes of a server whose every store faults in fresh pages."""
    layout = SIZES["2MiB"]
    ns = Namespace(DEFAULT_TENANT, "kvtier-bench/fill", "r1", layout)
    data = tiers.payload(layout, seed=99)
    per_call = data.nbytes * blocks
    for call in range(-(-nbytes // per_call)):
        start = (10**6 + call * blocks) * layout.block_tokens
        tokens = np.arange(start, start + blocks * layout.block_tokens, dtype=np.uint32)
        put_via_buffers(client, ns, tokens, [data] * blocks)


def _shm_ops(client: KVTierClient):
    """:func:`_client_ops` with the put of a caller producing into leased buffers (:func:`put_via_buffers`)."""
    def put(ns, tokens, data, durable):
        put_via_buffers(client, ns, tokens, [data], durable=durable)

    return put, _client_ops(client)[1]


def grpc_rows(ctx: BenchContext, tier: str, notes: list[str]) -> list[dict]:
    """kvtier's gRPC path against a fresh server of ``tier``."""
    with kvtier_server(ctx.workdir, f"transport-{tier}", ctx.workdir / f"transport-grpc-{tier}",
                       store=tiers.SETTINGS[tier]) as address, KVTierClient(address, timeout=120,
                                                                            data_path="grpc") as client:
        client.wait_ready(30)
        return _measure(ctx, "grpc", tier, *_client_ops(client), notes)


def shm_rows(ctx: BenchContext, notes: list[str]) -> list[dict]:
    """kvtier's same-host path (``data_path="shm"``, service/shm) against a fresh memory-only server:
    one block per call (``shm``), and ``SHM_BATCHES`` blocks per call (``shm_batch``), beside a memcpy
    and Redis round trips of the same blocks per call."""
    batches = (2,) if ctx.tiny else SHM_BATCHES[:1] if ctx.quick else SHM_BATCHES
    with kvtier_server(ctx.workdir, "transport-shm", ctx.workdir / "transport-shm-warm",
                       store=SHM_SETTINGS) as address, \
            KVTierClient(address, timeout=120, data_path="shm") as client:
        client.wait_ready(30)
        if not ctx.tiny:
            ctx.step(f"shm: filling the warm tier ({SHM_WARM_BYTES >> 20} MiB)")
            fill_warm(client, SHM_WARM_BYTES + (64 << 20))
        rows = _measure(ctx, "shm", "warm", *_shm_ops(client), notes)
        for blocks in batches:
            rows += _shm_batch(ctx, client, blocks, notes)
    notes.append("shm: shared-memory data path, memory-only server whose warm tier is full before the timed Puts "
                 "(evicted blocks' memory is reused, as Redis's SETs overwrite keys); shm_batch: blocks_per_call "
                 "blocks per call, fresh blocks every Put, Get of a "
                 "resident chain; memcpy_batch/redis_batch move the same blocks per call; every shm Put is "
                 "a caller producing its blocks into leased arena buffers (block_buffers), the fill (one copy "
                 "of the payload) timed as part of the Put")
    return rows


def _shm_batch(ctx: BenchContext, client: KVTierClient, blocks: int, notes: list[str]) -> list[dict]:
    layout = SIZES["360KiB"] if ctx.tiny else SIZES["2MiB"]
    ns = namespace(layout)
    data = tiers.payload(layout, seed=blocks)
    per_call = data.nbytes * blocks
    n = ctx.iterations(per_call, lo=3 if ctx.quick else 8, hi=20)
    base = iter(range(10**6))

    def tokens() -> np.ndarray:  # a chain never stored before: every block of it is new
        start = next(base) * blocks
        return np.concatenate([tiers.block_tokens(layout, 10**5 + start + j) for j in range(blocks)])

    warm_up = 2 if ctx.tiny else -(-SHM_WARM_BYTES // per_call) + 1  # tiny: toy sizes, recycling does not matter
    ctx.step(f"shm batch {blocks} x {data.nbytes >> 10} KiB: filling the warm tier ({warm_up} puts)")
    for _ in range(warm_up):
        put_via_buffers(client, ns, tokens(), [data] * blocks)
    ctx.step(f"shm batch put/get {blocks} x {data.nbytes >> 10} KiB x{n}")
    chains: list[np.ndarray] = []

    def put(_i: int) -> None:
        chains.append(tokens())
        put_via_buffers(client, ns, chains[-1], [data] * blocks)

    rows = [batch_row("shm_batch", "put", data.nbytes, blocks, time_ops(put, n), tier="warm")]
    keys = chain_keys(ns, chains[-1])
    got = client.get(keys)
    if len(got.blocks) != blocks or any(b.reshape(-1).view(torch.uint8).numpy().tobytes() != data.tobytes()
                                        for b in (got.blocks[0], got.blocks[-1])):
        notes.append(f"shm_batch {blocks}: Get returned different bytes (or fewer blocks) than were put")
    del got
    rows.append(batch_row("shm_batch", "get", data.nbytes, blocks, time_ops(lambda i: client.get(keys), n), tier="warm"))
    rows += peers.memcpy_batch_rows(data, blocks, n)
    rows += peers.copyto_batch_rows(data, blocks)
    rows += peers.redis_batch_rows(ctx, data, blocks, n, notes)
    return rows


def resume_rows(ctx: BenchContext, notes: list[str]) -> list[dict]:
    """restore_cache of a SmolLM2 session (2048 tokens; 512 quick, 64 tiny) over shm vs gRPC streams."""
    from kvtier.service.integrations.hf import namespace_for, restore_cache, save_cache

    from kvtier.service.apps.bench.model import conversation, get_model, prefill
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
    """Notes comparing the shm rows with memcpy, Redis and the gRPC streams of the same blocks per call
    (targets: Get >= 0.5x memcpy and >= 5x Redis, Put >= 0.4x memcpy), and the shm/gRPC resume speedup."""
    out = []
    for r in rows:
        if r["path"] not in ("shm", "shm_batch") or r["tier"] != "warm":
            continue
        blocks = r.get("blocks_per_call")
        refs = (("memcpy_batch", "redis_batch") if blocks else ("memcpy", "redis", "grpc"))
        parts = []
        for ref in refs:
            peer = next((p for p in rows if p["path"] == ref and p["op"] == r["op"]
                         and p["block_bytes"] == r["block_bytes"] and p.get("blocks_per_call") == blocks
                         and p["tier"] in ("warm", "-")), None)
            if peer is not None and (v := ratio(r["gbps"], peer["gbps"])) is not None:
                parts.append(f"{ref} {v:.2f}x")
        if parts:
            out.append(f"{r['path']} {r['op']} {blocks or 1} x {r['block_bytes'] >> 10} KiB per call vs "
                       + ", ".join(parts))
    rs = {r["path"]: r["p50_ms"] for r in rows if r["path"].startswith("resume_")}
    if (v := ratio(rs.get("resume_grpc"), rs.get("resume_shm"))) is not None:
        out.append(f"resume over shm is {v:.2f}x faster than over gRPC streams (p50)")
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
    # The reference is zstd decompression of the byte-shuffled records (shuffle_zstd), whatever codec
    # the cold tier writes by default: "cold Get vs zstd decompress alone" compares with that.
    default = tiers.store_config("cold", ctx.workdir / "unused")
    codec = Codec(default.zstd_level, CodecId.SHUFFLE_ZSTD)
    rows += peers.cold_ceiling_rows(ctx, payloads, "float16", codec)
    if "hot" not in tiers.available():
        notes.append("hot tier not measured: no CUDA device")
    notes.append("cold: memory tiers off, Put durable (fsync off), Get = LMDB read + decode every time")
    return {"rows": rows, "notes": notes}
