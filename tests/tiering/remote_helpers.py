"""Helpers of the remote-tier tests: cold records of exact sizes, tiers on the test cluster, raw access.

``make_tier`` and ``raw`` are fixtures: a test module imports them to use them.
"""

from __future__ import annotations

import os

import pytest
from redis.cluster import ClusterNode, RedisCluster

from kvtier.tiering.codec import HEADER, Codec, CodecId
from kvtier.tiering.keys import BlockKey
from kvtier.tiering.remote import RemoteConfig, RemoteTier
from kvtier.tiering.remote import records
from tests.fixtures import tracked

PART = 64 * 1024
RAW_CODEC = Codec(codec=CodecId.RAW)


def record_of(total: int, seed: int = 0) -> bytes:
    """A real cold record (RAW codec, uint8) of exactly ``total`` bytes (``total - 40`` must be even)."""
    raw_len = total - HEADER.size
    assert raw_len > 0 and raw_len % 2 == 0
    raw = os.urandom(raw_len) if seed == 0 else bytes((seed + i) % 251 for i in range(raw_len))
    return RAW_CODEC.encode(raw, "uint8", (2, 1, 1, 1, raw_len // 2))


def key(n: int) -> BlockKey:
    return BlockKey(n.to_bytes(16, "big"))


def tier_config(cluster, **kw) -> RemoteConfig:
    base = dict(seeds=tuple(cluster.seeds), max_part_bytes=PART, ttl_s=600.0, write="all",
                base_timeout_s=0.5, breaker_failures=3, breaker_cooldown_s=0.5, key_prefix="t:")
    base.update(kw)
    return RemoteConfig(**base)


def raw_client(cluster) -> RedisCluster:
    """A plain redis-py cluster client of the test cluster (to damage, inspect and copy values)."""
    host, port = cluster.seeds[0].split(":")
    return RedisCluster(startup_nodes=[ClusterNode(host, int(port))], socket_timeout=5)


def part_names(k: BlockKey, count: int, prefix: str = "t:") -> list[bytes]:
    return records.part_names(records.block_base(prefix, k), count)


def node_of(cluster, k: BlockKey, prefix: str = "t:") -> int:
    return cluster.master_of_key(records.block_base(prefix, k))


@pytest.fixture
def make_tier(redis_cluster):
    """Factory of remote tiers on the test cluster (``sealer=`` optional); every one is closed at the end."""
    def build(sealer=None, **kw) -> RemoteTier:
        return RemoteTier(tier_config(redis_cluster, **kw), sealer=sealer)

    with tracked(build) as make:
        yield make


@pytest.fixture
def raw(redis_cluster):
    client = raw_client(redis_cluster)
    yield client
    client.close()


__all__ = ["PART", "key", "make_tier", "node_of", "part_names", "raw", "raw_client", "record_of", "tier_config"]
