"""Prometheus /metrics of service.metrics, scraped over HTTP and parsed like Prometheus would."""

from __future__ import annotations

import math
import socket
import time
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.service import __version__
from kvtier.service.server.telemetry import setup_telemetry
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from tests.fixtures.wire import namespace, put_stream, random_blocks, stub
from tests.fixtures.wire import tokens as token_ids

LAYOUT = BlockLayout("float16", layers=2, kv_heads=2, head_dim=64, block_tokens=4)
BLOCK = LAYOUT.block_bytes()
NS = Namespace("tenant-secret", "m", "r", LAYOUT)


def tokens(seq: int, blocks: int) -> list[int]:
    return [seq * 1000 + j for j in range(blocks * LAYOUT.block_tokens)]


def payload(i: int) -> bytes:
    return bytes((i * 7 + j) % 5 for j in range(BLOCK))


@pytest.fixture
def scraped(data_dir):
    """(store, scrape) with hot 2 blocks, warm 2 blocks, cold on; ``scrape()`` → {(name, labels): value}."""
    tel = setup_telemetry(None)
    store = TieredStore(StoreConfig(data_dir=data_dir, hot_device="cpu", hot_capacity=2 * BLOCK,
                                    warm_capacity=2 * BLOCK, warm_pin="off", cold_capacity=4 << 20,
                                    durable_sync=False, maintenance_s=0.05, compress_threads=1))
    port = tel.start_metrics(store, port=0)

    def scrape() -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            text = resp.read().decode()
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        out["_text"] = text
        return out

    yield store, scrape, tel
    tel.shutdown()
    store.close()


def tier(m: dict, name: str, t: str) -> float:
    return m[(name, (("tier", t),))]


def test_metrics_off_without_port():
    tel = setup_telemetry(None)
    assert tel.start_metrics(object()) is None and tel.metrics_port is None


def test_per_tier_series_move_with_puts_hits_misses_evictions(scraped):
    store, scrape, _ = scraped
    m0 = scrape()
    for t in ("hot", "warm", "cold"):
        assert tier(m0, "kvtier_tier_hits_total", t) == 0
        assert tier(m0, "kvtier_tier_capacity_bytes", t) > 0
    assert tier(m0, "kvtier_tier_capacity_bytes", "hot") == 2 * BLOCK

    res = store.put(NS, tokens(1, 6), [payload(i) for i in range(6)], durable=True)  # 6 blocks, room for 4
    m1 = scrape()
    assert m1[("kvtier_puts_total", ())] == 1 and m1[("kvtier_blocks_stored_total", ())] == 6
    assert tier(m1, "kvtier_tier_used_bytes", "hot") == 2 * BLOCK
    assert tier(m1, "kvtier_tier_blocks", "cold") == 6
    assert tier(m1, "kvtier_tier_demotions_total", "hot") == 4
    assert tier(m1, "kvtier_tier_evictions_total", "hot") == 0
    assert tier(m1, "kvtier_tier_evictions_total", "warm") == 2  # write-through: dropped, on disk already
    assert tier(m1, "kvtier_tier_demotions_total", "warm") == 0  # ... so not a demotion as well
    assert ("kvtier_moved_bytes_total", (("from", "warm"), ("to", "cold"))) not in m1
    assert m1[("kvtier_moved_bytes_total", (("from", "hot"), ("to", "warm")))] == 4 * BLOCK
    assert m1[("kvtier_compression_ratio", ())] > 1.0
    assert m1[("kvtier_put_conflicts_total", ())] == 0 and m1[("kvtier_background_write_failures_total", ())] == 0

    list(store.iter_blocks(res.keys[-1:]))  # last block: still hot
    list(store.iter_blocks(res.keys[:1]))  # first block: evicted from memory, read from cold, promoted
    m2 = scrape()
    assert tier(m2, "kvtier_tier_hits_total", "hot") == 1
    assert tier(m2, "kvtier_tier_hits_total", "cold") == 1
    assert tier(m2, "kvtier_tier_misses_total", "hot") == 1 and tier(m2, "kvtier_tier_misses_total", "warm") == 1
    assert tier(m2, "kvtier_tier_promotions_total", "hot") == 1
    assert m2[("kvtier_moved_bytes_total", (("from", "cold"), ("to", "hot")))] == BLOCK

    miss = list(store.iter_blocks([_absent_key(store)]))
    assert miss[0][1] is None
    m3 = scrape()
    assert tier(m3, "kvtier_tier_misses_total", "cold") == 1
    assert "tenant-secret" not in m3["_text"]  # labels are tier/method/code only
    store.put(NS, tokens(1, 6), [bytes(BLOCK)], first_block=5)  # the last (hot) block, other bytes: a conflict
    assert scrape()[("kvtier_put_conflicts_total", ())] == 1


def _absent_key(store):
    """A key of a never-stored sequence (derived, not stored)."""
    from kvtier.tiering.keys import chain_keys

    return chain_keys(NS, tokens(9, 1))[0]


def test_latency_histograms(scraped):
    store, scrape, tel = scraped
    res = store.put(NS, tokens(1, 2), [payload(i) for i in range(2)], session_id="s", durable=True)
    _, _, handle = store.resume("tenant-secret", "s")
    assert handle.future.result(5) == 2
    tel.metrics.observe_rpc("Lookup", "OK", 0.002)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        m = scrape()
        if m.get(("kvtier_resume_ready_seconds_count", ()), 0) >= 1:
            break
        time.sleep(0.02)
    assert m[("kvtier_prefetch_duration_seconds_count", ())] == 1
    assert m[("kvtier_resume_ready_seconds_count", ())] == 1
    assert m[("kvtier_rpc_duration_seconds_count", (("code", "OK"), ("method", "Lookup")))] == 1
    assert m[("kvtier_pinned_blocks", ())] >= 0 and m[("kvtier_cold_write_queue_depth", ())] >= 0
    assert res.stored


def test_closed_store_scrapes_empty_not_500(scraped):
    store, scrape, _ = scraped
    store.close()
    m = scrape()
    assert ("kvtier_tier_hits_total", (("tier", "hot"),)) not in m
    assert not math.isnan(m.get(("kvtier_rpc_duration_seconds_count", ()), 0.0))


# ----------------------------------------------------------------------------------------------------
# Prometheus conventions and the series issue 14 asked for
def test_names_follow_prometheus_conventions(scraped):
    from prometheus_client.parser import text_string_to_metric_families

    store, scrape, _ = scraped
    store.put(NS, tokens(2, 3), [payload(i) for i in range(3)], durable=True)  # hot holds 2: one moves down
    m = scrape()
    families = list(text_string_to_metric_families(m["_text"]))
    assert not [s.name for f in families for s in f.samples if s.name.endswith("_created")]
    for fam in families:
        if fam.type == "counter":
            assert all(s.name.endswith("_total") for s in fam.samples), fam.name
    names = {s.name for f in families for s in f.samples}
    assert {"kvtier_moved_bytes_total", "kvtier_cold_raw_written_bytes_total",
            "kvtier_cold_record_written_bytes_total", "kvtier_lookup_query_tokens_total",
            "kvtier_lookup_hit_tokens_total", "process_resident_memory_bytes", "process_cpu_seconds_total",
            "python_info", "python_gc_collections_total"} <= names
    assert not names & {"kvtier_bytes_moved_total", "kvtier_cold_raw_bytes_written_total"}
    info = [k for k in m if k != "_text" and k[0] == "kvtier_build_info"]
    assert len(info) == 1 and ("version", __version__) in info[0][1] and m[info[0]] == 1


def test_lookup_token_counters_through_a_real_server(kvtier_process):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = kvtier_process(extra_env={"KVTIER_TELEMETRY__METRICS_PORT": str(port)}).start()
    ns = namespace(model="metrics/lookup")
    channel, kv = stub(proc.target)
    with channel:
        kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=token_ids(32), block_count=2),
                          random_blocks(ns, 32)), timeout=30)
        found = kv.Lookup(pb.LookupRequest(namespace=ns, token_ids=token_ids(48)), timeout=30)
        kv.Lookup(pb.LookupRequest(namespace=ns, token_ids=token_ids(16, seed=7)), timeout=30)  # a miss
    assert found.cached_tokens == 32
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    samples = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert samples["kvtier_lookup_query_tokens_total"] == 48 + 16
    assert samples["kvtier_lookup_hit_tokens_total"] == 32
