"""Scenario fleet: kvtier nodes sharing a Redis Cluster as their remote tier, beside redis-py on the same cluster.

One real local cluster (3 masters + 3 replicas, :mod:`~service.apps.bench.redis_cluster`) serves four parts:

* ``resume``: a SmolLM2 conversation (2048 tokens; quick 512; tiny: the toy model, 64) parked durably on
  server A; A is stopped and a fresh server B (empty data dir) resumes it from the remote tier alone:
  TTFT vs recompute, and vs B resuming it again from its own warm tier;
* ``get``: the remote tier's read of one 2 MiB block (MGET of its parts + TTL refresh, verified) vs
  redis-py's ``RedisCluster.get`` of the same stored bytes;
* ``write``: a durable session as a durable Put sends it (EXISTS of its blocks, their SETs + ``WAIT 1``
  per node, the session record + ``WAIT 1``) vs redis-py pipelines of the same SETs + ``WAIT 1``, one
  pipeline per node, then the session's bytes the same way;
* ``hits``: hit rate vs nodes (1-4), :mod:`~service.apps.bench.fleet_hits`.

Imports the bench helpers, the client, the HF integration, the server's settings and the engine's remote
tier. Without ``redis-server``/``redis-cli`` the scenario is ``not measured``, with a note.
"""

from __future__ import annotations

import contextlib
import json
import statistics
import time

from kvtier.service.apps.bench import fleet_hits, tiers
from kvtier.service.apps.bench.context import BenchContext, MiB, ratio, summarize, time_ops
from kvtier.service.apps.bench.model import conversation, get_model, prefill
from kvtier.service.apps.bench.procs import kvtier_server
from kvtier.service.apps.bench.redis_cluster import HOST, LocalRedisCluster, redis_installed
from kvtier.service.apps.bench.resume import NEW_TOKENS, recompute, restore_once
from kvtier.service.client.client import KVTierClient
from kvtier.service.integrations.hf import namespace_for, save_cache
from kvtier.service.server.config import RemoteSettings
from kvtier.tiering.codec import Codec
from kvtier.tiering.keys import Namespace, chain_keys
from kvtier.tiering.layout import BlockLayout
from kvtier.tiering.remote import RemoteConfig, RemoteTier, records
from kvtier.tiering.remote import sessions as remote_sessions
from kvtier.tiering.remote import units as remote_units

#: 2 MiB float16 blocks (16 layers, 8 KV heads, head_dim 64, 64 tokens): one part each at the default 4 MiB
BIG = BlockLayout("float16", layers=16, kv_heads=8, head_dim=64, block_tokens=64)
#: the remote tier's settings in this bench (timeouts sized for a loaded 2-core machine; all else default)
REMOTE = {"base_timeout_s": 2.0, "min_throughput_bps": "20MiB", "min_replicas": 1, "write": "durable"}


def remote_config(cluster: LocalRedisCluster, prefix: str) -> RemoteConfig:
    """The engine's :class:`RemoteConfig` a server with :func:`remote_env` would build (``prefix`` apart)."""
    return RemoteSettings(seeds=cluster.seeds, key_prefix=prefix, **REMOTE).to_remote_config()


def remote_env(cluster: LocalRedisCluster, prefix: str) -> dict[str, str]:
    """``[remote]`` settings of a bench server as ``kvtier_server(remote=...)`` strings."""
    return {"seeds": json.dumps(cluster.seeds), "key_prefix": prefix, **{k: str(v) for k, v in REMOTE.items()}}


def run(ctx: BenchContext) -> dict:
    """Rows with ``part`` = resume / get / write / hits; ``resume_speedup``, ``get_vs_redis`` and
    ``write_vs_raw`` (with ``*_at``) for :mod:`~service.apps.bench.targets`."""
    if not redis_installed():
        return {"status": "not measured", "rows": [], "notes": [
            "redis-server/redis-cli not installed (apt-get install -y redis-server): the fleet scenario needs a "
            "local Redis Cluster"]}
    ctx.step("starting a Redis Cluster (3 masters + 3 replicas)")
    out: dict = {"rows": [], "notes": []}
    with contextlib.ExitStack() as stack:
        cluster = LocalRedisCluster(ctx.workdir / "redis-cluster").start()
        stack.callback(cluster.stop)
        for part in (_resume, _get, _write, _hits):
            res = part(ctx, cluster)
            out["rows"] += res.pop("rows")
            out["notes"] += res.pop("notes", [])
            out.update(res)
    out["notes"].append(f"cluster: {cluster.masters} masters + {cluster.replicas} replica each, appendonly, "
                        f"127.0.0.1; remote tier settings {REMOTE} (timeouts only differ from the defaults)")
    return out


def _hits(ctx: BenchContext, cluster: LocalRedisCluster) -> dict:
    return fleet_hits.run(ctx, cluster, REMOTE)


# ---- resume across nodes ------------------------------------------------------------------------------
def _resume(ctx: BenchContext, cluster: LocalRedisCluster) -> dict:
    n = 64 if ctx.tiny else 512 if ctx.quick else 2048
    reps = 1 if ctx.quick else 3
    bm = get_model(ctx)
    ns = namespace_for(bm.model, fingerprint=bm.fingerprint)
    history = conversation(bm, n)
    ids = history + conversation(bm, NEW_TOKENS, seed=1)
    ctx.step(f"recompute {n}+{NEW_TOKENS} tokens x{reps}")
    base, ref_token = recompute(bm, ids, reps)
    remote = remote_env(cluster, "bench-resume:")
    store = tiers.SETTINGS["warm"]
    ctx.step(f"park {n} tokens durably on server A")
    with kvtier_server(ctx.workdir, "fleet-a", ctx.workdir / "fleet-a", store=store, remote=remote) as a, \
            KVTierClient(a, timeout=300) as ka:
        save_cache(ka, ns, "fleet-chat", history, prefill(bm, history)[0], durable=True)
    samples: dict[str, list] = {"remote": [], "warm": []}
    for rep in range(reps):  # A is gone; each B starts empty, so its first resume reads the remote tier only
        ctx.step(f"resume on a fresh server B ({rep + 1}/{reps})")
        with kvtier_server(ctx.workdir, "fleet-b", ctx.workdir / f"fleet-b{rep}", store=store, remote=remote) as b, \
                KVTierClient(b, timeout=300) as kb:
            samples["remote"].append(restore_once(kb, bm, ns, "fleet-chat", ids))
            samples["warm"].append(restore_once(kb, bm, ns, "fleet-chat", ids))  # now promoted into B's warm tier
    rows = [{"part": "resume", "source": "recompute", "tokens": n, "ttft_s": base, "speedup": 1.0}]
    notes = []
    for source, got in samples.items():
        ttft = statistics.median(s[0] for s in got)
        rows.append({"part": "resume", "source": f"B {source}", "tokens": n, "ttft_s": ttft,
                     "restore_s": statistics.median(s[1] for s in got), "speedup": ratio(base, ttft),
                     "cached_tokens": min(s[2] for s in got), "token_match": int(all(s[3] == ref_token for s in got))})
        if min(s[2] for s in got) < n:
            notes.append(f"resume from B {source}: only {min(s[2] for s in got)} of {n} tokens were restored")
    remote_row = rows[1]
    notes.append(f"resume: {bm.name}, fp32 KV, parked durably on A (then stopped), resumed on a fresh B (empty data "
                 f"dir: the remote tier only); median of {reps}; 'B warm' is B's second resume, from its own warm tier")
    return {"rows": rows, "notes": notes, "resume_speedup": remote_row["speedup"],
            "resume_speedup_at": f"{n} tokens, {bm.name}"}


# ---- blocks of 2 MiB in the cluster ----------------------------------------------------------------------
def _blocks(count: int, seed: int) -> list[tuple]:
    """``count`` (key, cold-format record) pairs of 2 MiB float16 blocks (the cold tier's default codec)."""
    ns = Namespace("default", "fleet-bench", f"s{seed}", BIG)
    keys = chain_keys(ns, list(range(count * BIG.block_tokens)))
    codec = Codec()
    return [(k, codec.encode(tiers.payload(BIG, seed + i), BIG.dtype, BIG.shape())) for i, k in enumerate(keys)]


def _raw_client(cluster: LocalRedisCluster):
    from redis.cluster import ClusterNode, RedisCluster

    port = int(cluster.seeds[0].rsplit(":", 1)[1])
    return RedisCluster(startup_nodes=[ClusterNode(HOST, port)], socket_timeout=30, decode_responses=False)


def _get(ctx: BenchContext, cluster: LocalRedisCluster) -> dict:
    distinct = 4 if ctx.tiny else 16
    items = _blocks(distinct, seed=100)
    n = ctx.iterations(BIG.block_bytes(), lo=5, hi=200)
    cfg = remote_config(cluster, "bench-get:")
    with contextlib.closing(RemoteTier(cfg)) as tier, contextlib.closing(_raw_client(cluster)) as raw:
        tier.put_many(items, durable=True)
        names = [records.block_base(cfg.key_prefix, k) for k, _ in items]
        misses = []

        def remote_get(i: int) -> None:
            key = items[i % distinct][0]
            if key not in tier.get_many([key]):
                misses.append(i)

        ctx.step(f"remote Get vs RedisCluster.get, {n} x 2 MiB")
        runs = {"remote tier": [], "redis-py GET": []}
        for _ in range(2):  # interleaved rounds: drift on a shared machine hits both sides alike
            runs["remote tier"] += time_ops(remote_get, n // 2 or 1)
            runs["redis-py GET"] += time_ops(lambda i: raw.get(names[i % distinct]), n // 2 or 1)
        stored = len(raw.get(names[0]))
    rows = [{"part": "get", "path": path, "block_bytes": BIG.block_bytes(), "value_bytes": stored,
             **summarize(lat, stored)} for path, lat in runs.items()]
    notes = [f"get: {len(misses)} remote misses of {len(runs['remote tier'])} reads"] if misses else []
    return {"rows": rows, "notes": notes, "get_vs_redis": ratio(rows[0]["gbps"], rows[1]["gbps"]),
            "get_vs_redis_at": f"2 MiB blocks ({stored:,} B stored), one block a call"}


# ---- durable session writes ---------------------------------------------------------------------------
def _write(ctx: BenchContext, cluster: LocalRedisCluster) -> dict:
    count = 2 if ctx.tiny else 4 if ctx.quick else 8
    reps = 2 if ctx.tiny else 4 if ctx.quick else 12
    items = _blocks(count, seed=200)
    cfg = remote_config(cluster, "bench-write:")
    sid = b"default\0bench-session"
    session = json.dumps({"keys": [k.hex() for k, _ in items], "tokens": count * BIG.block_tokens}).encode()
    units = [remote_units.block_write(cfg, k, r) for k, r in items]
    session_name = records.session_name(cfg.key_prefix, sid)
    nbytes = sum(len(r) for _, r in items) + len(session)
    with contextlib.closing(RemoteTier(cfg)) as tier, contextlib.closing(_raw_client(cluster)) as raw:
        names = [c[1] for u in units for c in u.commands] + [session_name]

        def durable_session() -> None:  # what tiering/fleet.py's durable_put sends after the local commit
            keys = [k for k, _ in items]
            there = tier.contains_many(keys)
            tier.put_many([it for it, here in zip(items, there) if not here], durable=True)
            tier.put_session(sid, session, time.time_ns(), durable=True)

        def raw_set_wait() -> None:
            by_node: dict = {}
            for u in units:
                by_node.setdefault(raw.get_node_from_key(u.name).name, []).extend(u.commands)
            value = remote_sessions.pack(sid, session, time.time_ns())
            batches = [*by_node.values(), [("SET", session_name, value, "PX", cfg.ttl_ms)]]
            for cmds in batches:  # one pipeline per node, WAIT on the same connection as its SETs
                node = raw.get_node_from_key(cmds[0][1])
                pipe = raw.get_redis_connection(node).pipeline(transaction=False)
                for cmd in cmds:
                    pipe.execute_command(*cmd)
                pipe.execute_command("WAIT", 1, 10_000)
                if pipe.execute()[-1] < 1:
                    raise RuntimeError("raw SET + WAIT: no replica acknowledged")

        ctx.step(f"durable session writes vs SET + WAIT, {reps} x {nbytes / MiB:.0f} MiB")
        runs = {"remote tier durable session": [], "redis-py SET + WAIT": []}
        for i in range(reps + 1):  # the first round warms connections and is not kept
            for path, fn in (("remote tier durable session", durable_session), ("redis-py SET + WAIT", raw_set_wait)):
                for name in names:
                    raw.delete(name)
                t0 = time.perf_counter()
                fn()
                if i:
                    runs[path].append(time.perf_counter() - t0)
    rows = [{"part": "write", "path": path, "blocks": count, "session_bytes": nbytes, **summarize(lat, nbytes)}
            for path, lat in runs.items()]
    return {"rows": rows, "write_vs_raw": ratio(rows[0]["gbps"], rows[1]["gbps"]),
            "write_vs_raw_at": f"a session of {count} x 2 MiB blocks, WAIT 1"}
