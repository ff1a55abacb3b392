"""Scenario 4, scale: index RAM per block, Lookup latency and reopen time at 10^4, 10^5, 10^6 blocks.

Blocks are tiny (layout ``uint8:1x1x1/16``, 32 bytes) so a million of them are written in seconds,
straight into the cold tier with :meth:`tiering.cold.ColdTier.write_batch` (big batches, no fsync),
as conversations of 64 blocks (1024 tokens) each: the keys are the real chained keys of those tokens.
Each size is measured by a *fresh process* (``python -m kvtier.service.apps.bench.scale DATA_DIR N OUT``) so its
RSS says what the index costs: RSS after opening the store and answering the lookups, minus RSS
before opening it, divided by the blocks (``/proc/self/status``: ``VmRSS``, split into anonymous and
file-backed pages; LMDB's pages are file-backed and only the touched ones count).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from kvtier.tiering.keys import Namespace, chain_keys
from kvtier.tiering.layout import BlockLayout, blocks_for

from kvtier.service.apps.bench.context import BenchContext, percentile

LAYOUT = BlockLayout("uint8", 1, 1, 1, 16)
NAMESPACE = Namespace("bench", "kvtier-bench/scale", "r1", LAYOUT)
SEQ_BLOCKS = 64
SEQ_TOKENS = SEQ_BLOCKS * LAYOUT.block_tokens
MAP_BYTES = 4 << 30


def _tokens(seq: int) -> np.ndarray:
    return np.arange(seq * SEQ_TOKENS, (seq + 1) * SEQ_TOKENS, dtype=np.uint32)


def _rss() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "RssAnon", "RssFile"):
                out[name] = int(rest.split()[0]) * 1024
    return out


def populate(data_dir: Path, start_seq: int, end_seq: int) -> None:
    """Write the blocks of conversations ``[start_seq, end_seq)`` into the cold tier of ``data_dir``."""
    from kvtier.tiering.codec import Codec
    from kvtier.tiering.cold import ColdTier, ColdWrite
    from kvtier.tiering.sessions import namespace_to_dict

    codec = Codec()
    cold = ColdTier(str(data_dir / "cold"), MAP_BYTES, codec, durable_sync=False)
    try:
        payload = np.random.default_rng(0).integers(0, 256, LAYOUT.block_bytes(), dtype=np.uint8)
        record = codec.encode(memoryview(payload), LAYOUT.dtype, LAYOUT.shape())
        ns_rec = {NAMESPACE.ns_id: json.dumps(namespace_to_dict(NAMESPACE)).encode()}
        batch: list[ColdWrite] = []
        for seq in range(start_seq, end_seq):
            batch.extend(ColdWrite(k, record, NAMESPACE.ns_id) for k in chain_keys(NAMESPACE, _tokens(seq)))
            if len(batch) >= 16384 or seq == end_seq - 1:
                cold.write_batch(batch, namespaces=ns_rec)
                batch = []
        cold.sync()
    finally:
        cold.close()


def probe(data_dir: str, seqs: int, lookups: int) -> dict:
    """In a fresh process: open the store, time ``lookups`` random conversation lookups, measure RSS."""
    from kvtier.tiering.config import StoreConfig
    from kvtier.tiering.store import TieredStore

    cfg = StoreConfig(data_dir=data_dir, hot_device="off", warm_capacity=64 << 20, cold_capacity=MAP_BYTES,
                      durable_sync=False)
    rng = np.random.default_rng(1)
    picks = [_tokens(int(s)) for s in rng.integers(0, seqs, size=lookups)]
    before = _rss()
    t0 = time.perf_counter()
    store = TieredStore(cfg)
    first = store.lookup(NAMESPACE, picks[0])
    reopen_s = time.perf_counter() - t0
    lat = []
    hits = 0
    for ids in picks:
        t = time.perf_counter()
        got = store.lookup(NAMESPACE, ids)
        lat.append(time.perf_counter() - t)
        hits += got.blocks == SEQ_BLOCKS
    after = _rss()
    blocks = store.usage()["cold"]["blocks"]
    store.close()
    n = max(blocks, 1)
    return {"blocks": blocks, "reopen_s": reopen_s, "first_lookup_blocks": first.blocks,
            "lookup_p50_ms": percentile(lat, 50) * 1e3, "lookup_p99_ms": percentile(lat, 99) * 1e3,
            "lookup_blocks": SEQ_BLOCKS, "lookup_hit_rate": hits / max(len(picks), 1),
            "rss_bytes_per_block": (after["VmRSS"] - before["VmRSS"]) / n,
            "anon_bytes_per_block": (after["RssAnon"] - before["RssAnon"]) / n,
            "file_bytes_per_block": (after["RssFile"] - before["RssFile"]) / n}


def run(ctx: BenchContext) -> dict:
    """Rows ``{blocks, index_bytes_per_block, reopen_s, lookup_p50_ms, lookup_p99_ms, disk_bytes_per_block}``."""
    sizes = [1_000] if ctx.tiny else [10_000] if ctx.quick else [10_000, 100_000, 1_000_000]
    data_dir = ctx.workdir / "scale"
    data_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    done = 0
    for n in sizes:
        want = blocks_for(n, SEQ_BLOCKS)
        ctx.step(f"writing {want * SEQ_BLOCKS:,} blocks")
        t0 = time.perf_counter()
        populate(data_dir, done, want)
        write_s = time.perf_counter() - t0
        done = want
        ctx.step(f"reopening {want * SEQ_BLOCKS:,} blocks in a fresh process")
        out = ctx.workdir / f"scale-{n}.json"
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        subprocess.run([sys.executable, "-m", "kvtier.service.apps.bench.scale", str(data_dir), str(want),
                        str(200 if ctx.tiny else 2000), str(out)], check=True, env=env, timeout=1800)
        got = json.loads(out.read_text())
        disk = sum(f.stat().st_blocks * 512 for f in (data_dir / "cold").iterdir() if f.name.endswith(".mdb"))
        rows.append({"target_blocks": n, **got, "index_bytes_per_block": got["rss_bytes_per_block"],
                     "disk_bytes_per_block": disk / max(got["blocks"], 1), "write_s": write_s})
    return {"rows": rows, "notes": [f"layout {LAYOUT.describe()} ({LAYOUT.block_bytes()} B blocks), lookups of "
                                    f"{SEQ_BLOCKS}-block conversations; RSS measured in a fresh process"]}


if __name__ == "__main__":
    result = probe(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
    Path(sys.argv[4]).write_text(json.dumps(result))
