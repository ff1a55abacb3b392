"""Fleet scenario, part ``hits``: hit rate vs number of nodes for conversations whose turns land on random nodes.

N in-process stores (1-4; separate data dirs), with and without the remote tier on the run's Redis
Cluster. Each conversation grows by one turn at a time; a turn goes to a random node (the same sequence of
nodes with and without the remote tier), which looks its history up (the hit: the prefix tokens any tier
of that node can serve, the remote tier included) and then parks the whole conversation with a durable
Put. Imports the bench helpers, the server's settings and the engine.
"""

from __future__ import annotations

import contextlib
import random

from kvtier.service.apps.bench.context import BenchContext
from kvtier.service.apps.bench.redis_cluster import LocalRedisCluster
from kvtier.service.server.config import RemoteSettings, Settings, StoreSettings
from kvtier.tiering import TieredStore
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout

#: 16 KiB blocks: the hit rate depends on where blocks are, not on their size
LAYOUT = BlockLayout("float16", layers=2, kv_heads=2, head_dim=64, block_tokens=16)
NS = Namespace("default", "fleet-hits", "r1", LAYOUT)
TURN_BLOCKS = 2


def _store(ctx: BenchContext, cluster: LocalRedisCluster | None, remote: dict, name: str, prefix: str) -> TieredStore:
    shared = RemoteSettings(seeds=cluster.seeds, key_prefix=prefix, **remote) if cluster else RemoteSettings()
    store = StoreSettings(data_dir=ctx.workdir / name, hot_device="off", warm_capacity="256MiB",
                          durable_sync=False)
    return TieredStore(Settings(store=store, remote=shared).store_config())


def _hit_rate(ctx: BenchContext, cluster: LocalRedisCluster | None, remote: dict, nodes: int, convs: int,
              turns: int) -> float:
    """Tokens found / history tokens looked up, over every turn after the first."""
    tag = f"hits-{nodes}-{'remote' if cluster else 'local'}"
    rng = random.Random(nodes)  # the same turn → node sequence with and without the remote tier
    payload = [bytes([c % 251 + 1]) * LAYOUT.block_bytes() for c in range(convs)]
    found = looked = 0
    with contextlib.ExitStack() as stack:
        stores = [stack.enter_context(_store(ctx, cluster, remote, f"{tag}-{i}", f"bench-{tag}:")) for i in range(nodes)]
        for turn in range(turns):
            for c in range(convs):
                node = stores[rng.randrange(nodes)]
                tokens = [c * 1_000_000 + t for t in range((turn + 1) * TURN_BLOCKS * LAYOUT.block_tokens)]
                history = tokens[:turn * TURN_BLOCKS * LAYOUT.block_tokens]
                if history:
                    found += node.lookup(NS, history).tokens
                    looked += len(history)
                blocks = [payload[c][:-8] + b"%08d" % i for i in range(len(tokens) // LAYOUT.block_tokens)]
                node.put(NS, tokens, blocks, session_id=f"conv-{c}", durable=True)
    return found / looked if looked else float("nan")


def run(ctx: BenchContext, cluster: LocalRedisCluster, remote: dict) -> dict:
    """Rows ``{part: hits, nodes, path, hit_rate}`` for 1-4 nodes, local only and with the remote tier
    (``remote``: its ``[remote]`` settings other than seeds and key prefix)."""
    convs, turns = (3, 3) if ctx.tiny else (8, 4) if ctx.quick else (16, 6)
    rows = []
    for nodes in range(1, 5):
        ctx.step(f"hit rate on {nodes} node(s)")
        for path, shared in (("local only", None), ("with remote tier", cluster)):
            rows.append({"part": "hits", "nodes": nodes, "path": path,
                         "hit_rate": _hit_rate(ctx, shared, remote, nodes, convs, turns)})
    return {"rows": rows, "notes": [
        f"hits: {convs} conversations x {turns} turns of {TURN_BLOCKS * LAYOUT.block_tokens} tokens, each turn on a "
        "random node (lookup of the history, then a durable Put of the conversation); fleet.png"]}
