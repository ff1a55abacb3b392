"""A fleet under cluster faults: failover under write load, the whole cluster down, a paused replica (WAIT
honesty), slot migration under multi-MB traffic, tiny maxmemory. kvtier keeps serving its local hits,
never claims a durability it lacks, never loses an acknowledged durable session, never serves wrong bytes.
"""

from __future__ import annotations

import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from redis.crc import key_slot

from kvtier.service.client.types import KVTierClientError
from kvtier.tiering import BlockLayout, Namespace
from kvtier.tiering.keys import chain_keys
from kvtier.tiering.remote import records
from tests.fixtures.fleet import (NS, PREFIX, block_names, client, fetch, fleet, park,  # noqa: F401
                                  remote_tier_stats, session_data)

#: 1 MiB blocks (float16, 8 layers, 4 heads, head_dim 128, 64 tokens) for multi-MB sessions
BIG = Namespace("default", "fleet-big", "r1", BlockLayout("float16", layers=8, kv_heads=4, head_dim=128,
                                                         block_tokens=64))


def serving(node) -> bool:
    with grpc.insecure_channel(node.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return resp.status == health_pb2.HealthCheckResponse.SERVING


class Traffic:
    """Durable puts of fresh sessions on one node in a thread: what was acknowledged, what failed how."""

    def __init__(self, node, first_seq: int, *, ns: Namespace = NS, blocks: int = 3, seqs=None) -> None:
        self.kv = client(node)
        self.ns, self.blocks = ns, blocks
        self.seqs = iter(seqs if seqs is not None else range(first_seq, first_seq + 10_000))
        self.acked: dict[str, list[bytes]] = {}
        self.refused: list[grpc.StatusCode] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        for seq in self.seqs:
            if self.stop.is_set():
                return
            sid = f"w{seq}"
            try:
                self.acked[sid] = park(self.kv, seq, sid, blocks=self.blocks, ns=self.ns)
            except KVTierClientError as exc:
                self.refused.append(exc.code)

    def __enter__(self) -> "Traffic":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join(120)
        self.kv.close()


def test_failover_under_write_load_loses_no_durable_session(fleet, redis_cluster):
    a, b = fleet("a"), fleet("b")
    with client(a) as ka:
        local = park(ka, 1, "local", durable=False)
        master = redis_cluster.masters_now()[0]
        slot = min(lo for lo, _hi, ports in redis_cluster.slot_ranges() if ports[0] == master)
        reads = 0
        with Traffic(a, 1000) as traffic:
            time.sleep(1.0)
            redis_cluster.kill(master)
            end = time.monotonic() + 30
            while redis_cluster.master_of_slot(slot) == master or reads < 20:
                assert fetch(ka, "local") == local  # local hits: never an error during the failover
                reads += 1
                assert time.monotonic() < end, "no failover within 30 s"
            redis_cluster.wait_failover(master, slot)
            time.sleep(1.0)
    assert set(traffic.refused) <= {grpc.StatusCode.UNAVAILABLE}  # refused honestly, never a wrong answer
    assert len(traffic.acked) >= 3
    with client(b) as kb:
        for sid, blocks in traffic.acked.items():
            assert fetch(kb, sid) == blocks, f"durable session {sid} lost or damaged after the failover"


def test_remote_down_local_serves_durable_refused(fleet, redis_cluster):
    a = fleet("a")
    with client(a) as ka:
        before = park(ka, 2, "before")
        for node in redis_cluster.nodes:
            redis_cluster.pause(node.port)
        try:
            assert fetch(ka, "before") == before
            kept = park(ka, 3, "nd", durable=False)
            assert fetch(ka, "nd") == kept
            with pytest.raises(KVTierClientError) as err:
                park(ka, 4, "d")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "remote tier" in err.value.details
            assert fetch(ka, "d") == session_data(4, 4)[1]  # its local copy stays
            assert serving(a)
            assert remote_tier_stats(a).state in ("open", "half-open")
        finally:
            for node in redis_cluster.nodes:
                redis_cluster.resume(node.port)


def test_a_paused_replica_makes_a_durable_put_fail(fleet, redis_cluster):
    a = fleet("a", min_replicas=1)
    master = redis_cluster.master_of_key(block_names(5, 4)[0])
    replica = redis_cluster.replicas_of(master)[0]
    with client(a) as ka:
        redis_cluster.pause(replica)
        try:
            with pytest.raises(KVTierClientError) as err:
                park(ka, 5, "wait")
            assert err.value.code == grpc.StatusCode.UNAVAILABLE and "replica" in err.value.details
        finally:
            redis_cluster.resume(replica)
        assert park(ka, 5, "wait")  # acknowledged once the replica answers again
    assert remote_tier_stats(a).state == "closed"


def _seqs_in_slots(lo: int, hi: int, n: int) -> list[int]:
    """Seeds of BIG sessions whose first block lands in slots ``[lo, hi)`` (those move during the reshard)."""
    out = []
    for seq in range(1000, 40_000):
        tokens = [seq * 100_000 + j for j in range(BIG.layout.block_tokens)]  # as session_data makes them
        if lo <= key_slot(records.block_base(PREFIX, chain_keys(BIG, tokens)[0])) < hi:
            out.append(seq)
            if len(out) == n:
                return out
    raise AssertionError("no seeds found")


def test_slot_migration_under_multi_mb_traffic(fleet, redis_cluster):
    a, b = fleet("a", max_part_bytes=1 << 20), fleet("b", max_part_bytes=1 << 20)
    src, dst = redis_cluster.masters_now()[:2]
    lo = min(s for s, _e, ports in redis_cluster.slot_ranges() if ports[0] == src)
    seqs = _seqs_in_slots(lo, lo + 300, 8)
    with client(b) as kb:
        with Traffic(a, 0, ns=BIG, blocks=2, seqs=seqs) as traffic:
            mover = threading.Thread(target=redis_cluster.reshard, args=(src, dst, 300))
            mover.start()
            while mover.is_alive():
                for sid, blocks in list(traffic.acked.items()):
                    assert fetch(kb, sid) == blocks  # reads during the move: no error, no wrong bytes
                time.sleep(0.05)
            mover.join(120)
            traffic.thread.join(120)
        assert redis_cluster.master_of_slot(lo) == dst
        assert traffic.refused == [] and len(traffic.acked) == len(seqs)
        for sid, blocks in traffic.acked.items():
            assert fetch(kb, sid) == blocks


@pytest.mark.parametrize("policy", ["noeviction", "allkeys-lru"])
def test_tiny_maxmemory_keeps_serving(fleet, redis_cluster, policy):
    a = fleet("a", write="all")
    for port in redis_cluster.masters_now():
        used = redis_cluster.node(port).admin().info("memory")["used_memory"]
        redis_cluster.config_set("maxmemory-policy", policy, [port])
        redis_cluster.config_set("maxmemory", used + 256 * 1024, [port])
    with client(a) as ka:
        parked = {f"m{i}": park(ka, 50 + i, f"m{i}", blocks=8, durable=False) for i in range(12)}
        for sid, blocks in parked.items():
            assert fetch(ka, sid) == blocks  # every local hit served
        assert serving(a)
    if policy == "noeviction":  # refused by the cluster: counted (once the async writer gives up), not raised
        end = time.monotonic() + 30
        while (stats := remote_tier_stats(a)).dropped_writes == 0:
            assert time.monotonic() < end, "no dropped write counted"
            time.sleep(0.2)
        assert stats.errors > 0
