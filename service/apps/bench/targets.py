"""The bench's targets: each one a ratio or a bound computed from this run's rows, met or missed.

A target whose inputs were not measured (a skipped scenario, telemetry not available) is reported with
``met = None`` and a note saying why, never as met. Where quick mode measures a smaller case than the
target names (512 tokens instead of 2048, 10^4 blocks instead of 10^6), ``measured_at`` says so.
"""

from __future__ import annotations

from collections.abc import Callable

from kvtier.service.apps.bench.context import ratio


def _rows(results: dict, scenario: str) -> list[dict]:
    return results.get("scenarios", {}).get(scenario, {}).get("rows", []) or []


def _pick(rows: list[dict], **match) -> dict | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


#: The one-block sizes issue 15's per-block targets name: 360 KiB and 2 MiB.
BLOCK_SIZES = (360 << 10, 2 << 20)


def _transport_ratio(results: dict, path: str, tier: str, ref: str, op: str,
                     sizes: tuple[int, ...] | None = None) -> tuple[float | None, str]:
    """The worst GB/s ratio of ``path`` over ``ref`` across block sizes (only ``sizes`` when given)."""
    rows = _rows(results, "transport")
    worst, where = None, ""
    for r in rows:
        if r["path"] != path or r["tier"] != tier or r["op"] != op or (sizes and r["block_bytes"] not in sizes):
            continue
        peer = _pick(rows, path=ref, op=op, block_bytes=r["block_bytes"])
        v = ratio(r.get("gbps"), peer.get("gbps") if peer else None)
        if v is not None and (worst is None or v < worst):
            worst, where = v, f"worst of block sizes, at {r['block_bytes'] // 1024} KiB"
    return worst, where


def _p50_vs(results: dict, path: str, ref: str, op: str) -> tuple[float | None, str]:
    """The worst p50 ratio of one-block ``path`` calls over ``ref``'s, at :data:`BLOCK_SIZES` (lower is better)."""
    rows = _rows(results, "transport")
    worst, where = None, ""
    for r in rows:
        if r["path"] != path or r["op"] != op or r["block_bytes"] not in BLOCK_SIZES or r.get("blocks_per_call"):
            continue
        peer = _pick(rows, path=ref, op=op, block_bytes=r["block_bytes"])
        v = ratio(r.get("p50_ms"), peer.get("p50_ms") if peer else None)
        if v is not None and (worst is None or v > worst):
            worst, where = v, (f"worst of block sizes, at {r['block_bytes'] // 1024} KiB "
                               f"({r['p50_ms']:.2f} vs {peer['p50_ms']:.2f} ms)")
    return worst, where


def _shm_batch(results: dict, op: str, refs: tuple[str, ...]) -> tuple[float | None, str]:
    """shm_batch GB/s over the best of ``refs`` (same block size; a batched ref with the same blocks per
    call), at the largest batch measured."""
    rows = _rows(results, "transport")
    mine = [r for r in rows if r["path"] == "shm_batch" and r["op"] == op]
    if not mine:
        return None, ""
    r = max(mine, key=lambda r: r["blocks_per_call"])
    peers = [p for p in rows if p["path"] in refs and p["op"] == op and p["block_bytes"] == r["block_bytes"]
             and p.get("blocks_per_call") in (None, r["blocks_per_call"])]
    best = max(peers, key=lambda p: p["gbps"], default=None)
    if best is None:
        return None, ""
    return ratio(r["gbps"], best["gbps"]), (f"{r['blocks_per_call']} x {r['block_bytes'] >> 10} KiB per call, "
                                           f"vs {best['path']}")


def _resume_paths(results: dict) -> tuple[float | None, str]:
    rows = {r["path"]: r for r in _rows(results, "transport") if r["path"].startswith("resume_")}
    shm, grpc = rows.get("resume_shm"), rows.get("resume_grpc")
    if not shm or not grpc:
        return None, ""
    return ratio(grpc["p50_ms"], shm["p50_ms"]), f"{shm.get('tokens')} tokens"


def _resume(results: dict, source: str) -> tuple[float | None, str]:
    rows = [r for r in _rows(results, "resume") if r.get("source") == source]
    if not rows:
        return None, ""
    r = max(rows, key=lambda r: r["tokens"])
    return r.get("speedup"), f"{r['tokens']} tokens"


def _codec(results: dict) -> tuple[float | None, str]:
    sc = results.get("scenarios", {}).get("codec", {})
    r = _pick(_rows(results, "codec"), dtype="bfloat16", codec=sc.get("default_codec"), level=sc.get("default_level"))
    return (r["disk_fraction"], f"{sc.get('default_codec')} level {sc.get('default_level')}") if r else (None, "")


def _scale(results: dict, field: str) -> tuple[float | None, str]:
    rows = _rows(results, "scale")
    if not rows:
        return None, ""
    r = max(rows, key=lambda r: r["blocks"])
    return r.get(field), f"{r['blocks']:,} blocks"


def _concurrency(results: dict) -> tuple[float | None, str]:
    """p99 of the shared-memory path (a same-host caller's default) at the most clients, over the bare
    grpc.aio echo's p99 at the same number of clients."""
    rows = _rows(results, "concurrency")
    shm = [r for r in rows if r.get("path") == "shm"]
    if not shm:
        return None, ""
    r = max(shm, key=lambda r: r["clients"])
    echo = _pick(rows, path="grpc_echo", clients=r["clients"])
    if echo is None:
        return None, ""
    return ratio(r["p99_ms"], echo["p99_ms"]), (f"{r['clients']} clients: {r['p99_ms']:.1f} vs "
                                                f"{echo['p99_ms']:.1f} ms")


def _tracing(results: dict) -> tuple[float | None, str]:
    sc = results.get("scenarios", {}).get("tracing", {})
    return sc.get("on_over_off"), sc.get("measured_at", "")


def _computed(results: dict, scenario: str, field: str) -> tuple[float | None, str]:
    """A ratio the scenario computed itself (``lmcache_peer.py``, ``fleet.py``) and where it was measured."""
    sc = results.get("scenarios", {}).get(scenario, {})
    return sc.get(field), sc.get(f"{field}_at", "")


#: (id, description, getter, comparison, threshold, the case the target names)
TARGETS: list[tuple[str, str, Callable[[dict], tuple[float | None, str]], str, float, str]] = [
    ("shm_one_get_vs_redis", "one-block same-host Get p50 / redis-py GET p50 of the same bytes",
     lambda r: _p50_vs(r, "shm", "redis", "get"), "<=", 1.0, "360 KiB and 2 MiB"),
    ("shm_one_put_vs_redis", "one-block same-host Put p50 / redis-py SET p50 of the same bytes",
     lambda r: _p50_vs(r, "shm", "redis", "put"), "<=", 1.0, "360 KiB and 2 MiB"),
    ("grpc_get_vs_echo", "kvtier gRPC Get (warm) / bare gRPC stream",
     lambda r: _transport_ratio(r, "grpc", "warm", "grpc_echo", "get", BLOCK_SIZES), ">=", 0.8, "360 KiB and 2 MiB"),
    ("grpc_put_vs_echo", "kvtier gRPC Put (warm) / bare gRPC stream",
     lambda r: _transport_ratio(r, "grpc", "warm", "grpc_echo", "put", BLOCK_SIZES), ">=", 0.8, "360 KiB and 2 MiB"),
    ("resume_warm_speedup", "resume from warm: recompute TTFT / restore TTFT",
     lambda r: _resume(r, "warm"), ">=", 20.0, "2048 tokens"),
    ("resume_cold_speedup", "resume from cold: recompute TTFT / restore TTFT",
     lambda r: _resume(r, "cold"), ">=", 10.0, "2048 tokens"),
    ("resume_cold_fp8_speedup", "resume from a lossy (fp8_e4m3) cold tier: recompute TTFT / restore TTFT",
     lambda r: _resume(r, "cold_fp8"), ">=", 10.0, "2048 tokens"),
    ("resume_warm_vs_oracle", "warm resume TTFT / TTFT with the cache that never left process memory",
     lambda r: _computed(r, "resume", "ttft_vs_oracle_warm"), "<=", 1.10, "2048 tokens"),
    ("resume_cold_vs_oracle", "cold resume TTFT / TTFT with the cache that never left process memory",
     lambda r: _computed(r, "resume", "ttft_vs_oracle_cold"), "<=", 1.5, "2048 tokens"),
    ("shm_get_vs_copyto", "shared-memory Get of a session's chain / one np.copyto of its bytes into a touched "
     "buffer (best of 5)", lambda r: _shm_batch(r, "get", ("copyto_batch",)), ">=", 0.7, "64 x 2 MiB"),
    ("shm_get_vs_redis", "shared-memory Get of warm blocks / Redis GET (its faster of GET and MGET)",
     lambda r: _shm_batch(r, "get", ("redis", "redis_batch")), ">=", 5.0, "2 MiB blocks"),
    ("shm_put_vs_memcpy", "shared-memory Put / memcpy of the same bytes",
     lambda r: _shm_batch(r, "put", ("memcpy_batch",)), ">=", 0.4, "2 MiB blocks"),
    ("resume_shm_vs_grpc", "resume of a SmolLM2 session: gRPC streams p50 / shared memory p50",
     _resume_paths, ">=", 1.0, "2048 tokens"),
    ("cold_read_vs_zstd", "engine cold Get / zstd decompress alone",
     lambda r: _transport_ratio(r, "engine", "cold", "zstd", "get"), ">=", 0.8, ""),
    ("bf16_disk_fraction", "bf16 bytes on disk / raw (lossless)", _codec, "<=", 0.70, ""),
    ("index_ram_per_block", "index RAM per block (RSS delta / blocks), bytes",
     lambda r: _scale(r, "index_bytes_per_block"), "<=", 200.0, "1,000,000 blocks"),
    ("reopen_seconds", "store reopen time, seconds", lambda r: _scale(r, "reopen_s"), "<=", 10.0, "1,000,000 blocks"),
    ("concurrency_p99_vs_echo", "p99 Get of 360 KiB over the same-host path / the bare grpc.aio echo's p99",
     _concurrency, "<=", 0.5, "32 clients"),
    ("tracing_overhead", "Get throughput with tracing on / off", _tracing, ">=", 0.95, ""),
    ("lmcache_same_host", "kvtier shm p50 retrieve / LMCache server's (fastest transport), worst workload",
     lambda r: _computed(r, "lmcache", "same_host_ratio"), "<=", 0.5, "every workload (--peers lmcache)"),
    ("lmcache_same_host_store", "kvtier shm p50 store / LMCache server's (fastest transport), worst workload",
     lambda r: _computed(r, "lmcache", "same_host_store_ratio"), "<=", 1.0, "every workload (--peers lmcache)"),
    ("lmcache_grpc", "LMCache server over gRPC p50 / kvtier gRPC p50, worst workload and op",
     lambda r: _computed(r, "lmcache", "grpc_speedup"), ">=", 1.0, "every workload (--peers lmcache)"),
    ("fleet_resume_speedup", "cross-node resume from the remote tier only: recompute TTFT / resume TTFT",
     lambda r: _computed(r, "fleet", "resume_speedup"), ">=", 10.0, "2048 tokens"),
    ("fleet_get_vs_redis", "remote tier Get of a 2 MiB block / redis-py RedisCluster GET of the same bytes",
     lambda r: _computed(r, "fleet", "get_vs_redis"), ">=", 0.8, "2 MiB blocks"),
    ("fleet_write_vs_raw", "durable session write to the remote tier / redis-py SET + WAIT of the same bytes",
     lambda r: _computed(r, "fleet", "write_vs_raw"), ">=", 0.8, ""),
]


# Issue 17's lossy-codec targets live beside their scenario (quality.py), in the same form.
from kvtier.service.apps.bench.quality import TARGETS as _QUALITY_TARGETS  # noqa: E402

TARGETS += _QUALITY_TARGETS


def evaluate(results: dict, targets: list | None = None) -> list[dict]:
    """One dict per target (of ``targets``, default all :data:`TARGETS`): ``id``, ``description``,
    ``value``, ``op``, ``threshold``, ``met`` (bool or ``None`` when not measured), ``measured_at``,
    ``target_at``."""
    out = []
    for tid, desc, getter, op, threshold, target_at in (TARGETS if targets is None else targets):
        try:
            value, where = getter(results)
        except (KeyError, TypeError, ValueError):
            value, where = None, ""
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        out.append({"id": tid, "description": desc, "value": value, "op": op, "threshold": threshold, "met": met,
                    "measured_at": where, "target_at": target_at})
    return out
