"""Lossy cold codecs through a real server: opt-in per tenant, exact-only callers never get lossy bytes
(gRPC streams and shared memory), exact and lossy namespaces of one model side by side, bytes saved shown.

One server process with ``[store] lossy_codecs = {"acme" = ["fp8_e4m3"]}``: the tests put durable blocks,
restart it (memory tiers empty: every block comes back from its cold record) and read them back.
"""

from __future__ import annotations

import json

import grpc
import numpy as np
import pytest
import torch

from kvtier.service.client.client import KVTierClient
from kvtier.service.client.types import KVTierClientError
from kvtier.service.server.metrics import StoreCollector
from kvtier.tiering import BlockLayout, Namespace, TieredStore
from kvtier.tiering.config import StoreConfig

LAYOUT = BlockLayout("float32", layers=2, kv_heads=2, head_dim=16, block_tokens=16)
EXACT = Namespace("acme", "m", "r", LAYOUT)
LOSSY = Namespace("acme", "m", "r", LAYOUT, cold_codec="fp8_e4m3")
TOKENS = list(range(3 * LAYOUT.block_tokens))
POLICY = {"KVTIER_STORE__LOSSY_CODECS": json.dumps({"acme": ["fp8_e4m3"]})}


def _blocks(seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.shape(), generator=g) for _ in range(3)]


@pytest.fixture(scope="module")
def restarted(tmp_path_factory):
    """A server that stored the same tokens under EXACT (session ``e``) and LOSSY (session ``l``), durable,
    then restarted; yields it, the stats before the restart, and the exact blocks put."""
    from tests.fixtures.server import KVTierProcess

    proc = KVTierProcess(tmp_path_factory.mktemp("lossy"), extra_env=POLICY).start()
    try:
        raw = _blocks(0)
        with KVTierClient(proc.target, data_path="grpc") as c:
            exact = c.put(EXACT, TOKENS, raw, session_id="e", durable=True)
            lossy = c.put(LOSSY, TOKENS, raw, session_id="l", durable=True)
            assert not set(exact.keys) & set(lossy.keys)
            # memory keeps the exact bytes while it has them
            assert c.get(lossy.keys, namespace=LOSSY).lossy == [False] * 3
            stats = c.stats()
        proc.restart()
        yield proc, stats, raw, exact.keys, lossy.keys
    finally:
        proc.kill()


@pytest.mark.parametrize("path", ["grpc", "shm"])
def test_exact_only_get_is_a_miss_and_accept_lossy_a_lossy_hit(restarted, path):
    proc, _stats, raw, _exact_keys, keys = restarted
    with KVTierClient(proc.target, data_path=path) as c:
        refused = c.get(keys, namespace=LOSSY)
        assert len(refused) == 0 and refused.reason == "miss" and refused.stopped_at == 0
        got = c.get(keys, namespace=LOSSY, accept_lossy=True)
        assert len(got) == 3 and got.lossy == [True] * 3
        for want, have in zip(raw, got.blocks):
            assert not torch.equal(want, have) and torch.allclose(want, have, atol=0.25, rtol=0.07)
        again = c.get(keys, namespace=LOSSY)  # promoted to memory, still lossy: still a miss
        assert len(again) == 0 and again.reason == "miss"


@pytest.mark.parametrize("path", ["grpc", "shm"])
def test_exact_namespace_of_the_same_model_stays_exact(restarted, path):
    proc, _stats, raw, keys, _lossy_keys = restarted
    with KVTierClient(proc.target, data_path=path) as c:
        got = c.get(keys, namespace=EXACT)
        assert len(got) == 3 and got.lossy == [False] * 3
        assert all(torch.equal(a, b) for a, b in zip(raw, got.blocks))


def test_lookup_and_resume_say_which_blocks_are_lossy(restarted):
    proc, *_ = restarted
    with KVTierClient(proc.target, data_path="grpc") as c:
        assert c.lookup(EXACT, TOKENS).cached_blocks == 3
        assert c.lookup(LOSSY, TOKENS).cached_blocks == 0
        found = c.lookup(LOSSY, TOKENS, accept_lossy=True)
        assert found.cached_blocks == 3 and found.lossy == [True] * 3
        assert c.resume("l", namespace=LOSSY).cached_blocks == 0
        info = c.resume("l", namespace=LOSSY, accept_lossy=True)
        assert info.cached_blocks == 3 and info.lossy == [True] * 3
        assert c.resume("e", namespace=EXACT).lossy == [False] * 3


def test_stats_show_the_bytes_a_lossy_codec_saved(restarted):
    _proc, stats, *_ = restarted
    raw, stored = stats.counters["codec_raw_bytes_fp8_e4m3"], stats.counters["codec_stored_bytes_fp8_e4m3"]
    assert raw == 3 * LAYOUT.block_bytes() and 0 < stored < raw / 3.5
    assert stats.counters["codec_raw_bytes_blosc2_zstd"] == 3 * LAYOUT.block_bytes()


@pytest.mark.parametrize("ns", [Namespace("other", "m", "r", LAYOUT, cold_codec="fp8_e4m3"),
                                Namespace("acme", "m", "r", LAYOUT, cold_codec="int4")])
def test_a_codec_the_setting_does_not_allow_is_refused(restarted, ns):
    proc, *_ = restarted
    with KVTierClient(proc.target, data_path="grpc") as c:
        with pytest.raises(KVTierClientError) as err:
            c.put(ns, TOKENS, _blocks(1))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "lossy_codecs" in err.value.details
    assert [f for f, _ in err.value.field_violations] == ["header.namespace.cold_codec"]


def test_metrics_count_raw_and_stored_bytes_per_codec(tmp_path):
    store = TieredStore(StoreConfig(data_dir=str(tmp_path), hot_device="cpu", hot_capacity=1 << 20,
                                    warm_capacity=1 << 20, warm_pin="off", cold_capacity=64 << 20,
                                    durable_sync=False))
    try:
        store.put(LOSSY, TOKENS, [b.numpy() for b in _blocks(2)], durable=True)
        families = {f.name: f for f in StoreCollector(store).collect()}
    finally:
        store.close()
    raw = {s.labels["codec"]: s.value for s in families["kvtier_cold_codec_raw_bytes"].samples
           if s.name.endswith("_total")}
    stored = {s.labels["codec"]: s.value for s in families["kvtier_cold_codec_stored_bytes"].samples
              if s.name.endswith("_total")}
    assert raw == {"fp8_e4m3": 3 * LAYOUT.block_bytes()} and 0 < stored["fp8_e4m3"] < raw["fp8_e4m3"] / 3.5
    assert np.isfinite(stored["fp8_e4m3"])


def test_the_setting_names_only_known_codecs():
    from pydantic import ValidationError

    from kvtier.service.server.config import StoreSettings

    assert StoreSettings(lossy_codecs={"*": ["int4/g32"], "acme": ["fp8_e4m3"]}).lossy_codecs["acme"] == ["fp8_e4m3"]
    with pytest.raises(ValidationError, match="unknown lossy codec"):
        StoreSettings(lossy_codecs={"acme": ["fp4"]})
