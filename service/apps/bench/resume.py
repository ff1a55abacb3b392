"""Scenario 2, resume: time to the first new token of a resumed conversation, recompute vs restore.

A conversation of N tokens (512 and 2048; quick: 512) gets a new 16-token user turn. *Recompute*
prefills all N + 16 tokens with :func:`kvtier.service.apps.model.greedy_generate` and no cache. *Restore* parks the
history's KV in a kvtier server first (:func:`kvtier.service.integrations.hf.save_cache`, fp32 blocks: token-exact), then
times ``restore_cache`` (Resume RPC + Get of the session's blocks + building the ``DynamicCache``)
plus the prefill of the 16 new tokens over it. Sources: a ``warm`` server, a ``cold`` server (memory
tiers off: every block read from LMDB and decoded), ``cold_fp8`` (the same, for the model's namespace
with the opt-in lossy cold codec ``fp8_e4m3``, restored with ``accept_lossy``; not in tiny mode) and
``restart`` (a warm server stopped and started again on its data directory: blocks come from disk and
are promoted). Every restored run's first token is compared with the recomputed one (``token_match``;
a lossy restore may differ, which the row then shows).

The ``oracle`` row is the floor a restore is held to: the TTFT of the same new turn over the cache that
never left process memory (a deep copy of the cache the model's own prefill of the history built, taken
before the timed step, so its first forward appends, and copies, as transformers' ``DynamicLayer`` does).
An oracle sample is taken right before every restore sample (this box is shared: load drifts between
minutes); each restored row says ``ttft_vs_oracle``, the median over its samples of the restore's TTFT
over the oracle sample taken just before it, and ``oracle_ttft_s``; the ``oracle`` row is the median of
every oracle sample at that length. The scenario
exposes ``ttft_vs_oracle_warm`` and ``ttft_vs_oracle_cold`` (at the longest conversation, with
``..._at`` naming it) for the target table.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import statistics
import time

from kvtier.service.client.client import KVTierClient
from kvtier.service.apps.model import greedy_generate
from kvtier.service.integrations.hf import namespace_for, restore_cache, save_cache

from kvtier.service.apps.bench import tiers
from kvtier.service.apps.bench.context import BenchContext, ratio
from kvtier.service.apps.bench.model import conversation, get_model, prefill
from kvtier.service.apps.bench.procs import kvtier_server

NEW_TOKENS = 16
#: source -> (server tier settings, lossy cold codec of the namespace or "")
SOURCES = {"warm": ("warm", ""), "cold": ("cold", ""), "cold_fp8": ("cold", "fp8_e4m3"), "restart": ("warm", "")}


def _settings(source: str) -> dict[str, str]:
    tier, codec = SOURCES[source]
    return {**tiers.SETTINGS[tier], **({"lossy_codecs": json.dumps({"*": [codec]})} if codec else {})}


def restore_once(client: KVTierClient, bm, ns, sid: str, ids: list[int]) -> tuple[float, float, int, int]:
    """One timed resume of session ``sid`` continued by ``ids``: (ttft_s, restore_s, cached_tokens, first_token)."""
    t0 = time.perf_counter()
    cache, used = restore_cache(client, sid, ids, namespace=ns, accept_lossy=bool(ns.cold_codec))
    t1 = time.perf_counter()
    gen = greedy_generate(bm.model, ids, cache, max_new_tokens=1)
    return time.perf_counter() - t0, t1 - t0, used, gen.tokens[0]


def oracle_once(bm, cache, ids: list[int]) -> tuple[float, int]:
    """TTFT of the new turn over a deep copy of ``cache`` (the history's own prefill, never stored; the copy
    is taken before the timed step) and the first token."""
    own = copy.deepcopy(cache)
    gen = greedy_generate(bm.model, ids, own, max_new_tokens=1)
    return gen.ttft_s, gen.tokens[0]


def _paired(bm, cache, ids: list[int], restore) -> tuple[tuple, tuple[float, int]]:
    """One oracle sample right before one restore sample (``restore()``), so both see the same load."""
    floor = oracle_once(bm, cache, ids)
    return restore(), floor


def recompute(bm, ids: list[int], reps: int) -> tuple[float, int]:
    """Median TTFT of prefilling ``ids`` with no cache (kernels warmed first) and the first token."""
    greedy_generate(bm.model, ids[:64], None, max_new_tokens=1)  # warm the kernels
    runs = [greedy_generate(bm.model, ids, None, max_new_tokens=1) for _ in range(reps)]
    return statistics.median(r.ttft_s for r in runs), runs[0].tokens[0]


def run(ctx: BenchContext) -> dict:
    """Rows ``{tokens, source, ttft_s, restore_s, speedup, cached_tokens, token_match, kv_bytes, ttft_vs_oracle}``
    and ``ttft_vs_oracle_warm``/``_cold`` (with ``_at``) at the longest conversation."""
    lengths = [64] if ctx.tiny else [512] if ctx.quick else [512, 2048]
    reps = 1 if ctx.tiny else 2 if ctx.quick else 3
    bm = get_model(ctx)
    ns = namespace_for(bm.model, fingerprint=bm.fingerprint)
    rows, notes = [], []
    for n in lengths:
        history = conversation(bm, n)
        ids = history + conversation(bm, NEW_TOKENS, seed=1)
        ctx.step(f"recompute {n}+{NEW_TOKENS} tokens x{reps}")
        base, ref_token = recompute(bm, ids, reps)
        kv_bytes = ns.layout.block_bytes(1) * n
        rows.append({"tokens": n, "source": "recompute", "ttft_s": base, "restore_s": 0.0, "speedup": 1.0,
                     "cached_tokens": 0, "token_match": 1, "kv_bytes": 0})
        cache = prefill(bm, history)[0]
        floors = []  # every oracle sample at this length, each taken right before a restore sample
        oracle_at = len(rows)
        # tiny: "restart" already walks the cold read path; a cold-only server would add ~10 s of startup
        sources = ("warm", "restart") if ctx.tiny else ("warm", "cold", "cold_fp8", "restart")
        for source in sources:
            ctx.step(f"restore {n} tokens from {source}")
            data_dir = ctx.workdir / f"resume-{source}-{n}"
            sid = f"bench-{n}"
            pairs = []
            src_ns = dataclasses.replace(ns, cold_codec=SOURCES[source][1])
            with kvtier_server(ctx.workdir, f"resume-{source}", data_dir, store=_settings(source)) as address, \
                    KVTierClient(address, timeout=300) as client:
                save_cache(client, src_ns, sid, history, cache, durable=True)
                if source != "restart":
                    pairs = [_paired(bm, cache, ids, lambda: restore_once(client, bm, src_ns, sid, ids))
                             for _ in range(reps)]
            for _ in range(reps if source == "restart" else 0):
                with kvtier_server(ctx.workdir, f"resume-{source}", data_dir, store=_settings(source)) as address, \
                        KVTierClient(address, timeout=300) as client:
                    pairs.append(_paired(bm, cache, ids, lambda: restore_once(client, bm, src_ns, sid, ids)))
            samples = [p[0] for p in pairs]
            floors += [p[1] for p in pairs]
            ttft = statistics.median(s[0] for s in samples)
            rows.append({"tokens": n, "source": source, "ttft_s": ttft,
                         "restore_s": statistics.median(s[1] for s in samples), "speedup": ratio(base, ttft),
                         "cached_tokens": min(s[2] for s in samples),
                         "token_match": int(all(s[3] == ref_token for s in samples)), "kv_bytes": kv_bytes,
                         "oracle_ttft_s": statistics.median(f[0] for _, f in pairs),
                         # the median of each restore over the oracle sample taken just before it
                         "ttft_vs_oracle": statistics.median(ratio(r[0], f[0]) for r, f in pairs)})
            if any(s[2] < n for s in samples):
                notes.append(f"{source} @{n}: only {min(s[2] for s in samples)} of {n} tokens were restored")
        floor = statistics.median(f[0] for f in floors)
        rows.insert(oracle_at, {"tokens": n, "source": "oracle", "ttft_s": floor, "restore_s": 0.0,
                                "speedup": ratio(base, floor), "cached_tokens": n,
                                "token_match": int(all(f[1] == ref_token for f in floors)), "kv_bytes": 0,
                                "oracle_ttft_s": floor, "ttft_vs_oracle": 1.0})
    notes.append(f"{bm.name}, fp32 KV (token-exact), new turn of {NEW_TOKENS} tokens, median of {reps}; "
                 "ttft_s = restore (Resume + Get + cache build) + prefill of the new turn; oracle = the same "
                 "prefill over a deep copy of the cache that never left memory")
    out = {"rows": rows, "notes": notes}
    longest = max(lengths)
    for source in ("warm", "cold"):
        row = next((r for r in rows if r["tokens"] == longest and r["source"] == source), None)
        if row is not None:
            out[f"ttft_vs_oracle_{source}"] = row["ttft_vs_oracle"]
            out[f"ttft_vs_oracle_{source}_at"] = f"{longest} tokens"
    return out
