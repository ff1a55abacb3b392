"""Limits one caller cannot exhaust for everyone (service/server/quota.py, errors.py's admission).

64 idle header-only Put streams of one tenant: those past its open-Put limit (32) are refused with
RESOURCE_EXHAUSTED naming its open-Put limit, while health checks answer SERVING and another tenant's
Put and Get are served. Headers declaring 256 MiB blocks reserve budget, not memory: the server's RSS
follows the bytes that arrived, and a second such header is refused with a QuotaFailure naming the
server-wide limit. A silent stream is closed after the idle timeout, storing nothing. One caller holds
at most its share of shared-memory arenas. Every refusal is logged without a traceback.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier.service.server.config import ServerSettings
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from tests.fixtures.wire import collect_get, details, namespace, put_stream, random_blocks, stub, tokens, wait_for

T = 60
NS = namespace(model="fair/model")
#: A tenant's open Puts at most, by default: half the server's 64 concurrent RPCs.
OPEN_PUTS = ServerSettings().max_open_puts_per_tenant


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        return int(next(line for line in fh if line.startswith("VmRSS:")).split()[1]) * 1024


def stalled_put(kv, messages: list[pb.PutRequest], gate: threading.Event, **kw) -> grpc.Future:
    """A Put that sends ``messages`` and then nothing until ``gate`` is set (no deadline unless given)."""
    def requests():
        yield from messages
        gate.wait(120)
    return kv.Put.future(requests(), **kw)


def subjects(err: grpc.RpcError) -> list[str]:
    return [v.subject for d in details(err) for v in getattr(d, "violations", ())]


def counters(kv) -> dict[str, int]:
    return dict(kv.Stats(pb.StatsRequest(), timeout=T).counters)


def test_idle_put_streams_of_one_caller_leave_health_and_other_callers_served(kvtier_process):
    proc = kvtier_process("fair").start()
    channel, kv = stub(proc.target)
    greedy = namespace(model="fair/greedy", tenant="greedy")
    header = pb.PutRequest(header=pb.PutHeader(namespace=greedy, token_ids=tokens(32, seed=51), block_count=2))
    gate = threading.Event()
    with channel:
        futures = [stalled_put(kv, [header], gate) for _ in range(64)]
        try:
            assert wait_for(lambda: sum(f.done() for f in futures) == 64 - OPEN_PUTS, 30), \
                f"{sum(f.done() for f in futures)} of 64 streams answered"
            refused = [f.exception() for f in futures if f.done()]
            assert {e.code() for e in refused} == {grpc.StatusCode.RESOURCE_EXHAUSTED}
            assert {tuple(subjects(e)) for e in refused} == {("tenant:greedy:open_puts",)}
            assert counters(kv)["puts_open"] == OPEN_PUTS
            health = health_pb2_grpc.HealthStub(channel)
            for service in ("", "kvtier.v1.KVCache"):
                status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=T).status
                assert status == health_pb2.HealthCheckResponse.SERVING
            other = namespace(model="fair/other", tenant="other")
            toks = tokens(48, seed=52)
            blocks = random_blocks(other, 48, seed=52)
            kv.Put(put_stream(pb.PutHeader(namespace=other, token_ids=toks, block_count=3, session_id="s"), blocks),
                   timeout=T)
            assert collect_get(kv.Get(pb.GetRequest(session_id="s", tenant="other"), timeout=T)).blocks == blocks
        finally:
            for f in futures:
                f.cancel()
            gate.set()
        # the held streams store nothing when they end
        assert kv.Lookup(pb.LookupRequest(namespace=greedy, token_ids=tokens(32, seed=51)), timeout=T).cached_blocks == 0
        assert wait_for(lambda: counters(kv)["puts_open"] == 0)
    assert "Traceback" not in proc.log_text()
    assert "RESOURCE_EXHAUSTED" in proc.log_text()  # logged once per refusal, as a WARNING line


def test_declared_bytes_reserve_budget_not_memory(kvtier_process):
    proc = kvtier_process("declared", extra_env={"KVTIER_SERVER__PUT_PENDING_BYTES": "384MiB"}).start()
    big = namespace(dtype="float32", layers=32, kv_heads=32, head_dim=128, block_tokens=256, model="fair/big")
    header = pb.PutRequest(header=pb.PutHeader(namespace=big, token_ids=tokens(256, seed=53), block_count=1))
    assert len(header.SerializeToString()) < 2048  # a small header declaring a 256 MiB block
    chunk = pb.PutRequest(chunk=pb.BlockChunk(block_index=0, offset=0, data=bytes(1 << 20)))
    channel, kv = stub(proc.target)
    gate = threading.Event()
    with channel:
        kv.Put(put_stream(pb.PutHeader(namespace=NS, token_ids=tokens(16, seed=54), block_count=1),
                          random_blocks(NS, 16, seed=54)), timeout=T)  # warm the Put path up
        before = rss_bytes(proc.proc.pid)
        first = stalled_put(kv, [header, chunk], gate)
        try:
            assert wait_for(lambda: counters(kv).get("put_received_bytes") == 1 << 20)
            assert counters(kv)["put_pending_bytes"] == 256 << 20
            grown = rss_bytes(proc.proc.pid) - before
            assert grown < 64 << 20, f"RSS grew by {grown >> 20} MiB for 1 MiB received"
            with pytest.raises(grpc.RpcError) as err:
                kv.Put(iter([header]), timeout=T)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert subjects(err.value) == ["server:put_pending_bytes"]
        finally:
            first.cancel()
            gate.set()
        assert wait_for(lambda: counters(kv)["put_pending_bytes"] == 0)
        # the budget is back: a small Put is served
        kv.Put(put_stream(pb.PutHeader(namespace=NS, token_ids=tokens(16, seed=55), block_count=1),
                          random_blocks(NS, 16, seed=55)), timeout=T)
    assert "Traceback" not in proc.log_text()


def test_a_silent_stream_is_closed_after_the_idle_timeout(kvtier_process):
    proc = kvtier_process("idle", extra_env={"KVTIER_SERVER__STREAM_IDLE_S": "1"}).start()
    toks = tokens(32, seed=56)
    header = pb.PutRequest(header=pb.PutHeader(namespace=NS, token_ids=toks, block_count=2, session_id="idle"))
    channel, kv = stub(proc.target)
    gate = threading.Event()
    with channel:
        try:
            fut = stalled_put(kv, [header], gate)  # no deadline: only the server's idle timeout ends it
            err = fut.exception(timeout=T)
        finally:
            gate.set()
        assert err is not None and err.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert "stream_idle_s" in err.details()
        assert kv.Lookup(pb.LookupRequest(namespace=NS, token_ids=toks), timeout=T).cached_blocks == 0
        with pytest.raises(grpc.RpcError) as missing:
            kv.Resume(pb.ResumeRequest(session_id="idle"), timeout=T)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    assert "Traceback" not in proc.log_text()


def test_one_caller_holds_at_most_its_share_of_arenas(kvtier_process):
    proc = kvtier_process("arenas", extra_env={"KVTIER_SERVER__SHM_ARENAS_PER_CALLER": "2"}).start()
    channel, kv = stub(proc.target)
    # another connection (channels to one target share theirs unless told not to): another caller
    other_channel = grpc.insecure_channel(proc.target, options=[("grpc.use_local_subchannel_pool", 1)])
    other = pb_grpc.KVCacheStub(other_channel)
    with channel, other_channel:
        for _ in range(2):
            kv.OpenArena(pb.OpenArenaRequest(size_bytes=1 << 20), timeout=T)
        with pytest.raises(grpc.RpcError) as err:
            kv.OpenArena(pb.OpenArenaRequest(size_bytes=1 << 20), timeout=T)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert subjects(err.value) == ["caller:arenas"]
        assert other.OpenArena(pb.OpenArenaRequest(size_bytes=1 << 20), timeout=T).arena_id


def test_an_unknown_upload_id_is_not_found(shared_server):
    from kvtier.service.client.client import KVTierClient

    with KVTierClient(shared_server.target, data_path="shm") as client:
        link = client._link(10)
        req = pb.PutShmRequest(arena_id=link.arena_id, upload_id="0123456789abcdef")
        with pytest.raises(grpc.RpcError) as err:
            client._stub.PutShm(req, timeout=T)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
