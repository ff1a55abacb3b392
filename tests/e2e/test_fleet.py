"""A fleet: kvtier server processes with their own data dirs sharing one real Redis Cluster as the remote tier.

A SmolLM2 conversation parked on A resumes on B token-exact; every durable session survives A's loss
(process and disk); a damaged or missing remote part is a counted miss and B resumes the verified
prefix; a value copied under another tenant's names is never served; deletes and invalidations reach
the cluster. Faults of the cluster itself: ``test_fleet_faults``.
"""

from __future__ import annotations

import shutil
import subprocess
import sys

import grpc
import pytest

from kvtier.service.client.types import KVTierClientError
from kvtier.service.integrations import hf
from kvtier.tiering import Namespace
from kvtier.tiering.keys import chain_keys
from kvtier.tiering.remote import records
from kvtier.tiering.sessions import session_id_key
from tests.e2e.test_resume_smollm2 import Conversation
from tests.fixtures.fleet import (LAYOUT, NS, PREFIX, block_names, client, fetch, fleet, lookup, park,  # noqa: F401
                                  remote_tier_stats, session_data)
from tests.fixtures.redis_cluster import HOST
from tests.fixtures.server import ROOT


def raw_cluster(cluster):
    from redis.cluster import ClusterNode, RedisCluster

    return RedisCluster(startup_nodes=[ClusterNode(HOST, int(cluster.seeds[0].rsplit(":", 1)[1]))], socket_timeout=5)


@pytest.mark.model
def test_a_conversation_parked_on_a_resumes_on_b_token_exact(smollm2, fleet):
    conv = Conversation(*smollm2)
    a, b = fleet("a"), fleet("b")
    with client(a) as ka:
        hf.save_cache(ka, conv.ns, "chat", conv.full1, conv.cache1, durable=True)
    found = lookup(b, conv.ns, conv.ids2)
    assert found.cached_tokens > 0 and found.remote_tokens == found.cached_tokens and found.local_tokens == 0
    with client(b) as kb:
        assert kb.resume("chat").tokens == len(conv.full1) - 1
        cache, tokens = hf.restore_cache(kb, "chat", conv.ids2, namespace=conv.ns)
        conv.check_restored(cache, tokens, vs_memory=True)  # same greedy tokens as recompute and memory
    again = lookup(b, conv.ns, conv.ids2)
    assert again.local_tokens == found.cached_tokens and again.remote_tokens == 0  # promoted into B
    assert remote_tier_stats(b).hits >= found.cached_blocks


def test_node_loss_keeps_every_durable_session(fleet):
    a, b = fleet("a"), fleet("b")
    with client(a) as ka:
        parked = {f"s{i}": park(ka, 10 + i, f"s{i}", blocks=2 + i % 4) for i in range(6)}
        park(ka, 99, "not-durable", durable=False)
    a.kill()
    shutil.rmtree(a.data_dir)
    with client(b) as kb:
        for sid, blocks in parked.items():
            info = kb.resume(sid)
            assert info.tokens == len(blocks) * LAYOUT.block_tokens
            assert fetch(kb, sid) == blocks, sid  # bit-exact
        with pytest.raises(KVTierClientError) as err:  # write = durable: only durable puts left A
            kb.resume("not-durable")
        assert err.value.code == grpc.StatusCode.NOT_FOUND


def test_damaged_or_missing_remote_parts_resume_the_verified_prefix(fleet, redis_cluster):
    a, b = fleet("a"), fleet("b")
    with client(a) as ka:
        blocks = park(ka, 20, "damaged", blocks=6)
    names = block_names(20, 6)
    raw = raw_cluster(redis_cluster)
    try:
        part = names[4] + b":1"
        value = bytearray(raw.get(part))
        value[len(value) // 2] ^= 0x01  # a flipped byte in block 4
        raw.set(part, bytes(value), keepttl=True)
        assert raw.delete(names[2] + b":2") == 1  # a missing part in block 2
    finally:
        raw.close()
    with client(b) as kb:
        assert kb.resume("damaged").tiers == ["remote"] * 6  # part 0 of each is there
        assert fetch(kb, "damaged") == blocks[:2]  # the verified prefix, never wrong bytes
        assert fetch(kb, "damaged") == blocks[:2]
    stats = remote_tier_stats(b)
    assert stats.misses >= 1 and stats.checksum_failures >= 1 and stats.state == "closed"
    shown = subprocess.run([sys.executable, "-m", "service", "stats", "--target", b.target], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0 and "remote: closed" in shown.stdout and "dropped writes 0" in shown.stdout


def test_a_value_under_another_tenants_names_is_never_served(fleet, redis_cluster):
    a, b = fleet("a"), fleet("b")
    with client(a) as ka:
        park(ka, 30, "victim", blocks=3)
    tokens, _ = session_data(30, 3)
    theirs = Namespace("mallory", NS.model, NS.revision, LAYOUT)
    raw = raw_cluster(redis_cluster)
    try:  # copy the victim's session record and every part under mallory's names
        for src, dst in zip(chain_keys(NS, tokens), chain_keys(theirs, tokens)):
            base, copy = records.block_base(PREFIX, src), records.block_base(PREFIX, dst)
            for i, name in enumerate(records.part_names(base, 3)):
                raw.set(records.part_names(copy, 3)[i], raw.get(name))
        raw.set(records.session_name(PREFIX, session_id_key("mallory", "victim")),
                raw.get(records.session_name(PREFIX, session_id_key("default", "victim"))))
    finally:
        raw.close()
    with client(b, tenant="mallory") as kb:
        with pytest.raises(KVTierClientError) as err:
            kb.resume("victim")
        assert err.value.code == grpc.StatusCode.NOT_FOUND
        found = kb.lookup(theirs, tokens)
        assert kb.get(found.keys).blocks == []  # bound to the victim's keys: a miss, never its bytes
    assert remote_tier_stats(b).checksum_failures >= 1


def test_delete_session_and_invalidate_reach_the_remote_tier(fleet):
    a, b = fleet("a"), fleet("b")
    other = Namespace("default", "fleet-model-2", "r1", LAYOUT)
    with client(a) as ka:
        park(ka, 40, "erased")
        park(ka, 41, "invalidated", ns=other)
        assert ka.delete_session("erased", erase_blocks=True) == 4
        assert ka.invalidate(other) == 4
    with client(b) as kb:
        for sid in ("erased", "invalidated"):
            with pytest.raises(KVTierClientError) as err:
                kb.resume(sid)
            assert err.value.code == grpc.StatusCode.NOT_FOUND
    for seq, ns in ((40, NS), (41, other)):
        assert lookup(b, ns, session_data(seq, 4)[0]).cached_tokens == 0


def test_remote_settings_and_metrics(redis_cluster, tmp_path, monkeypatch):
    from prometheus_client import CollectorRegistry, generate_latest

    from kvtier.service.server.config import Settings
    from kvtier.service.server.metrics import StoreCollector
    from kvtier.tiering import TieredStore

    assert Settings.load().store_config().remote is None  # no seeds: no remote tier
    secret = tmp_path / "pw"
    secret.write_text("from-file\n")
    monkeypatch.setenv("KVTIER_REMOTE__SEEDS", f'["{redis_cluster.seeds[0]}"]')
    monkeypatch.setenv("KVTIER_REMOTE__PASSWORD", "from-env")
    monkeypatch.setenv("KVTIER_REMOTE__WRITE", "all")
    settings = Settings.load(store={"data_dir": str(tmp_path / "d"), "hot_device": "off"})
    remote = settings.store_config().remote
    assert remote.seeds == (redis_cluster.seeds[0],) and remote.write == "all" and remote.password == "from-env"
    assert "from-env" not in repr(settings) and "from-env" not in repr(remote)
    monkeypatch.setenv("KVTIER_REMOTE__PASSWORD_FILE", str(secret))
    assert Settings.load().store_config().remote.password == "from-file"
    monkeypatch.delenv("KVTIER_REMOTE__PASSWORD")
    monkeypatch.delenv("KVTIER_REMOTE__PASSWORD_FILE")
    with TieredStore(Settings.load(store={"data_dir": str(tmp_path / "d"), "hot_device": "off"}).store_config()) as st:
        registry = CollectorRegistry()
        registry.register(StoreCollector(st))
        text = generate_latest(registry).decode()
    assert 'kvtier_remote_up{tier="remote"} 1.0' in text and 'kvtier_tier_hits_total{tier="remote"}' in text
    assert 'kvtier_remote_dropped_writes_total{tier="remote"} 0.0' in text
