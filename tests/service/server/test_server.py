"""The server process end to end: round trips, restarts, health, reflection, draining, stubs."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.fixtures.server import ROOT
from tests.fixtures.wire import collect_get, namespace, put_stream, random_blocks, stub, tokens

T = 30  # seconds: bound of every RPC in this module

# (namespace kwargs, tokens): block sizes 32 KiB, 1.5 MiB (> one chunk) and 4.5 MiB (> 4 MiB).
LAYOUTS = [
    (dict(dtype="float16", layers=4, kv_heads=2, head_dim=64, block_tokens=16), 53),
    (dict(dtype="float32", layers=12, kv_heads=8, head_dim=64, block_tokens=16), 40),
    (dict(dtype="bfloat16", layers=24, kv_heads=8, head_dim=128, block_tokens=48), 250),
    (dict(dtype="int8", layers=2, kv_heads=1, head_dim=32, block_tokens=8), 30),
    (dict(dtype="uint8", layers=3, kv_heads=3, head_dim=80, block_tokens=32), 64),
]


def _put(kv, ns, toks, payloads, *, session_id="", durable=False, first_block=0):
    header = pb.PutHeader(namespace=ns, token_ids=toks, session_id=session_id, durable=durable,
                          first_block=first_block, block_count=len(payloads))
    return kv.Put(put_stream(header, payloads), timeout=T)


def _get_session(kv, sid, tenant=""):
    return collect_get(kv.Get(pb.GetRequest(session_id=sid, tenant=tenant), timeout=T))


def test_round_trip_every_dtype_and_size_byte_exact(shared_server):
    channel, kv = stub(shared_server.target)
    with channel:
        stored = {}
        for i, (lay, n) in enumerate(LAYOUTS):
            ns = namespace(**lay)
            toks = tokens(n, seed=i)
            payloads = random_blocks(ns, n, seed=i)
            resp = _put(kv, ns, toks, payloads, session_id=f"s{i}")
            assert len(resp.keys) == len(payloads) and list(resp.stored) == list(resp.keys)
            stored[i] = (ns, toks, payloads, list(resp.keys))
            # read back at once, by keys
            got = collect_get(kv.Get(pb.GetRequest(keys=pb.KeyList(keys=resp.keys)), timeout=T))
            assert got.blocks == payloads and got.end.complete and got.end.tokens == n
            assert [h.dtype for h in got.headers] == [lay["dtype"]] * len(payloads)
            assert list(got.headers[-1].shape)[3] == n - (len(payloads) - 1) * lay["block_tokens"]
        # later, by session, after the small tiers evicted/demoted most of it (served from warm/cold)
        tiers_seen = set()
        for i, (ns, toks, payloads, keys) in stored.items():
            got = _get_session(kv, f"s{i}")
            assert got.blocks == payloads, f"layout {i} differs after eviction"
            assert [h.key for h in got.headers] == keys
            assert got.end.complete and got.end.reason == ""
            tiers_seen |= {h.tier for h in got.headers}
        assert pb.TIER_COLD in tiers_seen  # 16 MiB of warm cannot hold everything
        # the same blocks again are deduplicated
        ns, toks, payloads, keys = stored[1]
        assert list(_put(kv, ns, toks, payloads).skipped_present) == keys
        stats = kv.Stats(pb.StatsRequest(), timeout=T)
        assert [t.tier for t in stats.tiers] == [pb.TIER_HOT, pb.TIER_WARM, pb.TIER_COLD]
        assert stats.counters["puts"] >= len(LAYOUTS) + 1 and stats.version


def test_get_window_reasons_and_lookup(shared_server):
    channel, kv = stub(shared_server.target)
    with channel:
        ns = namespace()
        toks = tokens(16 * 6, seed=7)
        payloads = random_blocks(ns, len(toks), seed=7)
        keys = list(_put(kv, ns, toks, payloads[:4]).keys)  # blocks 4 and 5 never stored
        got = collect_get(kv.Get(pb.GetRequest(keys=pb.KeyList(keys=keys), start_block=1, max_blocks=2), timeout=T))
        assert got.blocks == payloads[1:3] and [h.index for h in got.headers] == [1, 2]
        assert (got.end.complete, got.end.reason, got.end.stopped_at, got.end.tokens) == (False, "max_blocks", 3, 32)
        got = collect_get(kv.Get(pb.GetRequest(keys=pb.KeyList(keys=keys)), timeout=T))
        assert (len(got.blocks), got.end.reason, got.end.stopped_at) == (4, "miss", 4)
        look = kv.Lookup(pb.LookupRequest(namespace=ns, token_ids=toks), timeout=T)
        assert (look.cached_blocks, look.cached_tokens, list(look.keys)) == (4, 64, keys)
        # resume from block 4 on: the two missing blocks, then the session
        resp = _put(kv, ns, toks, payloads[4:], first_block=4, session_id="w")
        assert list(resp.stored) == keys[4:]
        res = kv.Resume(pb.ResumeRequest(session_id="w"), timeout=T)
        assert (res.tokens, res.cached_blocks, list(res.keys)) == (96, 6, keys)
        assert kv.Prefetch(pb.PrefetchRequest(session_id="w", wait=True), timeout=T).ready_blocks == 6


def test_tenants_do_not_see_each_other(shared_server):
    channel, kv = stub(shared_server.target)
    with channel:
        ns = namespace(tenant="alice")
        toks = tokens(40, seed=3)
        payloads = random_blocks(ns, 40, seed=3)
        keys = list(_put(kv, ns, toks, payloads, session_id="chat").keys)
        mine = collect_get(kv.Get(pb.GetRequest(keys=pb.KeyList(keys=keys), tenant="alice"), timeout=T))
        assert mine.blocks == payloads
        theirs = collect_get(kv.Get(pb.GetRequest(keys=pb.KeyList(keys=keys), tenant="bob"), timeout=T))
        assert (theirs.blocks, theirs.end.reason, theirs.end.stopped_at) == ([], "miss", 0)
        with pytest.raises(grpc.RpcError) as err:
            _get_session(kv, "chat", tenant="bob")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert _get_session(kv, "chat", tenant="alice").blocks == payloads


def test_cancelled_get_releases_its_leases(shared_server):
    channel, kv = stub(shared_server.target)
    with channel:
        ns = namespace(dtype="float32", layers=12, kv_heads=8, head_dim=64, block_tokens=16)  # 1.5 MiB blocks
        toks = tokens(16 * 8, seed=11)
        keys = list(_put(kv, ns, toks, random_blocks(ns, len(toks), seed=11)).keys)
        # other tests' prefetches hold leases for lease_s (30 s): compare with the count before
        before = kv.Stats(pb.StatsRequest(), timeout=T).counters["active_leases"]
        call = kv.Get(pb.GetRequest(keys=pb.KeyList(keys=keys)), timeout=T)
        assert next(call).WhichOneof("msg") == "header"
        assert kv.Stats(pb.StatsRequest(), timeout=T).counters["active_leases"] == before + 1
        call.cancel()
        end = time.monotonic() + 10
        while kv.Stats(pb.StatsRequest(), timeout=T).counters["active_leases"] > before:
            assert time.monotonic() < end, "a cancelled Get kept its lease"
            time.sleep(0.1)


@pytest.mark.parametrize("how", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_restart_keeps_durable_blocks_and_sessions(server, how):
    ns = namespace(dtype="bfloat16", layers=24, kv_heads=8, head_dim=128, block_tokens=48)  # 4.5 MiB blocks
    toks = tokens(150, seed=5)
    payloads = random_blocks(ns, 150, seed=5)
    small = namespace()
    small_toks = tokens(70, seed=6)
    small_payloads = random_blocks(small, 70, seed=6)
    channel, kv = stub(server.target)
    with channel:
        _put(kv, ns, toks, payloads, session_id="big", durable=True)
        _put(kv, small, small_toks, small_payloads, session_id="small", durable=True)
        # not durable: on disk after a clean stop (close flushes), maybe not after SIGKILL
        _put(kv, small, tokens(20, seed=9), random_blocks(small, 20, seed=9), session_id="lazy")
    code = server.restart(how)
    assert code == (0 if how == signal.SIGTERM else -signal.SIGKILL)
    channel, kv = stub(server.target)
    with channel:
        assert _get_session(kv, "big").blocks == payloads
        assert _get_session(kv, "small").blocks == small_payloads
        res = kv.Resume(pb.ResumeRequest(session_id="big"), timeout=T)
        assert res.namespace.layout == ns.layout and res.namespace.tenant == "default"  # the unnamed tenant
        assert res.tokens == 150 and res.cached_blocks == 4
        if how == signal.SIGTERM:
            assert _get_session(kv, "lazy").end.complete
    assert "kvtier listening on 127.0.0.1:" in server.log_text()


def test_health_reflection_and_draining(server):
    channel, kv = stub(server.target)
    with channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "kvtier.v1.KVCache"):
            assert health.Check(health_pb2.HealthCheckRequest(service=name), timeout=T).status == \
                health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(channel)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                 timeout=T))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"kvtier.v1.KVCache", "grpc.health.v1.Health"} <= names

        # An in-flight Put (header sent, blocks held back) must finish during the grace period.
        ns = namespace()
        toks = tokens(32, seed=8)
        payloads = random_blocks(ns, 32, seed=8)
        release = threading.Event()

        def held_back():
            msgs = put_stream(pb.PutHeader(namespace=ns, token_ids=toks, block_count=2, durable=True), payloads)
            yield next(msgs)
            release.wait(T)
            yield from msgs

        watch = health.Watch(health_pb2.HealthCheckRequest(service=""), timeout=T)
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        put = kv.Put.future(held_back(), timeout=T)
        time.sleep(0.3)  # let the Put reach the server
        server.proc.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        end = time.monotonic() + 2
        while True:  # new RPCs are refused once server.stop() began (right after NOT_SERVING)
            try:
                kv.Stats(pb.StatsRequest(), timeout=1)
            except grpc.RpcError as exc:
                assert exc.code() == grpc.StatusCode.UNAVAILABLE
                break
            assert time.monotonic() < end, "server still accepts new RPCs while draining"
            time.sleep(0.05)
        release.set()
        assert len(put.result(timeout=T).stored) == 2
        watch.cancel()
    assert server.proc.wait(T) == 0
    server.start()
    channel, kv = stub(server.target)
    with channel:
        keys = kv.Lookup(pb.LookupRequest(namespace=ns, token_ids=toks), timeout=T).keys
        assert collect_get(kv.Get(pb.GetRequest(keys=pb.KeyList(keys=keys)), timeout=T)).blocks == payloads


def test_generated_stubs_are_fresh():
    done = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
