"""Limits answer RESOURCE_EXHAUSTED with a QuotaFailure naming the limit: blocks per request, per-tenant
cold bytes and sessions over the wire (real server on 127.0.0.1); per-tenant memory bytes and the
accounting behind both byte quotas on an in-process store."""

from __future__ import annotations

import threading

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.server.errors import QuotaExceeded
from kvtier.service.server.quota import Limits
from kvtier.service.server.errors import status_for
from tests.fixtures import wire
from tests.fixtures.server import KVTierProcess
from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore

Q1, Q2 = "tok-q1-aa01", "tok-q2-bb02"


def md(token):
    return (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def limited(tmp_path_factory):
    proc = KVTierProcess(tmp_path_factory.mktemp("quota-srv"), extra_env={
        "KVTIER_SECURITY__TOKENS": f'{{"{Q1}": "q1", "{Q2}": "q2"}}',
        "KVTIER_SECURITY__MAX_BLOCKS_PER_REQUEST": "4",
        "KVTIER_SECURITY__TENANT_COLD_BYTES": "200KiB",
        "KVTIER_SECURITY__MAX_SESSIONS_PER_TENANT": "2"}).start()
    channel, stub = wire.stub(proc.target)
    yield stub
    channel.close()
    proc.kill()


def put(stub, token, n_blocks, *, seed, session=""):
    ns = wire.namespace(model=f"quota/{seed}")  # 32 KiB blocks
    payloads = wire.random_blocks(ns, 16 * n_blocks, seed=seed)
    header = pb.PutHeader(namespace=ns, token_ids=wire.tokens(16 * n_blocks, seed=seed), block_count=n_blocks,
                          session_id=session, durable=True)
    return stub.Put(wire.put_stream(header, payloads), metadata=md(token), timeout=30)


def exhausted(call) -> str:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    (failure,) = [d for d in wire.details(err.value) if isinstance(d, error_details_pb2.QuotaFailure)]
    return failure.violations[0].subject


def test_blocks_per_request(limited):
    stub = limited
    assert exhausted(lambda: put(stub, Q1, 5, seed=1)) == "request:blocks"
    keys = pb.KeyList(keys=[bytes([i]) * 16 for i in range(5)])
    assert exhausted(lambda: list(stub.Get(pb.GetRequest(keys=keys), metadata=md(Q1), timeout=10))) == "request:blocks"
    assert exhausted(lambda: stub.Prefetch(pb.PrefetchRequest(keys=keys), metadata=md(Q1), timeout=10)) \
        == "request:blocks"
    assert exhausted(lambda: stub.Lookup(pb.LookupRequest(namespace=wire.namespace(), token_ids=list(range(65))),
                                         metadata=md(Q1), timeout=10)) == "request:blocks"
    assert stub.Lookup(pb.LookupRequest(namespace=wire.namespace(), token_ids=list(range(64))),
                       metadata=md(Q1), timeout=10).cached_blocks == 0


def test_sessions_per_tenant(limited):
    stub = limited
    put(stub, Q1, 1, seed=10, session="a")
    put(stub, Q1, 1, seed=10, session="b")
    assert exhausted(lambda: put(stub, Q1, 1, seed=10, session="c")) == "tenant:q1:sessions"
    put(stub, Q1, 1, seed=11, session="a")  # replacing an existing session is not a new one
    put(stub, Q2, 1, seed=10, session="c")  # another tenant has its own count
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="b", erase_blocks=True), metadata=md(Q1), timeout=10)
    put(stub, Q1, 1, seed=12, session="c")
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="a", erase_blocks=True), metadata=md(Q1), timeout=10)
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="c", erase_blocks=True), metadata=md(Q1), timeout=10)


def test_cold_bytes_per_tenant(limited):
    stub = limited
    put(stub, Q1, 4, seed=20, session="big")  # ~150 KiB of records
    assert exhausted(lambda: put(stub, Q1, 2, seed=21)) == "tenant:q1:cold_bytes"
    put(stub, Q2, 4, seed=21)  # q2's bytes are its own
    stub.DeleteSession(pb.DeleteSessionRequest(session_id="big", erase_blocks=True), metadata=md(Q1), timeout=10)
    assert len(put(stub, Q1, 2, seed=21).stored) == 2


# -- accounting and the memory quota, in process ----------------------------------------------------
NS_A = Namespace("a", "m", "r", BlockLayout("float16", 2, 2, 32, 16))
NS_B = Namespace("b", "m", "r", BlockLayout("float16", 2, 2, 32, 16))
BLOCK = NS_A.layout.block_bytes(16)  # 8 KiB


def blocks(n, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes() for _ in range(n)]


def test_tenant_usage_follows_puts_evictions_and_deletes(tmp_path):
    config = StoreConfig(data_dir=str(tmp_path), hot_device="cpu", hot_capacity=4 * BLOCK, warm_capacity=4 * BLOCK,
                         durable_sync=False)
    with TieredStore(config) as store:
        store.put(NS_A, list(range(96)), blocks(6), session_id="s", durable=True)
        store.put(NS_B, list(range(48)), blocks(3, 1), durable=True)
        a, b = store.tenant_usage("a"), store.tenant_usage("b")
        # 9 blocks in 8 blocks of memory: one of them was evicted to disk only
        assert a["memory"] + b["memory"] == 8 * BLOCK and b["cold"] > 3 * BLOCK and a["cold"] > 6 * BLOCK
        assert store.tenant_usage("nobody") == {"memory": 0, "cold": 0}
        assert store.session_count("a") == 1 and store.session_count("b") == 0
        store.delete_session("a", "s", erase_blocks=True)
        assert store.tenant_usage("a") == {"memory": 0, "cold": 0} and store.session_count("a") == 0
        assert store.check() == []
    with TieredStore(config) as store:  # cold counters survive a restart
        assert store.tenant_usage("b")["cold"] == b["cold"]


def test_memory_quota_sheds_the_tenants_own_blocks_first(tmp_path):
    config = StoreConfig(data_dir=str(tmp_path), hot_device="off", warm_capacity=64 * BLOCK, write_policy="write_back",
                         durable_sync=False)
    limits = Limits(tenant_memory_bytes=4 * BLOCK)
    with TieredStore(config) as store:
        with limits.admit_put(store, "a", 3 * BLOCK, False):
            a = store.put(NS_A, list(range(48)), blocks(3))
        store.put(NS_B, list(range(48)), blocks(3, 1))  # another tenant's blocks, older than nothing of a's
        with limits.admit_put(store, "a", 2 * BLOCK, False):  # at its quota: a's own oldest block makes room
            store.put(NS_A, list(range(100, 132)), blocks(2, 2))
        assert store.tenant_usage("a")["memory"] == 4 * BLOCK and store.tenant_usage("b")["memory"] == 3 * BLOCK
        # Shed to disk (write-back), not lost. Until the cold writer commits it the block waits in the
        # write-behind queue, which ``where`` names "warm" (still in host RAM): wait for the commit.
        store.flush()
        assert [store.where(k) for k in a.keys] == ["cold", "warm", "warm"]  # its oldest one, only
        lease = store.leases.acquire(store.lookup(NS_A, list(range(48))).keys[1:]
                                     + store.lookup(NS_A, list(range(100, 132))).keys, 60)
        with pytest.raises(QuotaExceeded) as err:  # its own blocks are all pinned: nothing can make room
            with limits.admit_put(store, "a", 2 * BLOCK, False):
                pass
        store.leases.release(lease)
        assert err.value.subject == "tenant:a:memory_bytes"
        with pytest.raises(QuotaExceeded):  # bigger than the whole quota
            limits.check_put(store, "a", 5 * BLOCK, False)


def test_memory_quota_is_hard_under_concurrent_puts(tmp_path):
    config = StoreConfig(data_dir=str(tmp_path), hot_device="off", warm_capacity=64 * BLOCK, cold_enabled=False)
    limits = Limits(tenant_memory_bytes=4 * BLOCK)
    with TieredStore(config) as store:
        with limits.admit_put(store, "a", 3 * BLOCK, False):  # a put admitted and still running...
            with pytest.raises(QuotaExceeded) as err:  # ...holds its bytes against the next one
                with limits.admit_put(store, "a", 2 * BLOCK, False):
                    pass
            assert err.value.subject == "tenant:a:memory_bytes"
            with limits.admit_put(store, "b", 4 * BLOCK, False):  # another tenant is not held back
                pass
        with limits.admit_put(store, "a", 2 * BLOCK, False):  # released when it ended
            pass
        errors = []

        def put(i):
            try:
                with limits.admit_put(store, "a", 2 * BLOCK, False):
                    store.put(NS_A, list(range(1000 * i, 1000 * i + 32)), blocks(2, i))
            except QuotaExceeded as exc:
                errors.append(exc)

        threads = [threading.Thread(target=put, args=(i,)) for i in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert store.tenant_usage("a")["memory"] <= 4 * BLOCK


def test_memory_quota_status_details(tmp_path):
    config = StoreConfig(data_dir=str(tmp_path), hot_device="off", warm_capacity=64 * BLOCK, cold_enabled=False)
    limits = Limits(tenant_memory_bytes=4 * BLOCK)
    with TieredStore(config) as store:
        with pytest.raises(QuotaExceeded) as err:
            limits.check_put(store, "a", 5 * BLOCK, False)
        assert err.value.subject == "tenant:a:memory_bytes"
        limits.check_put(store, "b", 4 * BLOCK, False)
        status = status_for(err.value)
        assert status.code == grpc.StatusCode.RESOURCE_EXHAUSTED
