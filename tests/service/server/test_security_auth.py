"""Bearer-token authentication and tenant isolation, against a real ``kvtier serve`` on 127.0.0.1.

Two tenants (``alpha`` from a tokens file, ``beta`` from the environment) and one admin token. The
scenario: alpha stores a session; beta, naming alpha's keys and session every way the API allows,
sees exactly what it would see for keys nobody stored, and moves nothing of alpha's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.server.auth import Authenticator, Principal, Unauthenticated, load_tokens_file
from kvtier.service.client.client import AsyncKVTierClient, KVTierClient
from kvtier.service.client.types import KVTierClientError
from tests.fixtures import wire
from tests.fixtures.server import ROOT, SMALL_STORE_ENV, KVTierProcess

ALPHA, BETA, ADMIN = "tok-alpha-7f3c", "tok-beta-91d2", "tok-admin-55aa"


def md(token: str | None):
    return None if token is None else (("authorization", f"Bearer {token}"),)


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    work = tmp_path_factory.mktemp("auth-srv")
    tokens_file = work / "tokens.json"
    tokens_file.write_text(json.dumps({"tokens": {ALPHA: "alpha"}, "admin_tokens": [ADMIN]}))
    proc = KVTierProcess(work, extra_env={"KVTIER_SECURITY__TOKENS_FILE": str(tokens_file),
                                          "KVTIER_SECURITY__TOKENS": json.dumps({BETA: "beta"})}).start()
    channel, stub = wire.stub(proc.target)
    yield proc, stub
    channel.close()
    proc.kill()


@pytest.fixture(scope="module")
def alpha_data(secured):
    """alpha's session ``s1``: 4 blocks of 64 tokens; returns (namespace, token ids, keys, payloads)."""
    _, stub = secured
    ns = wire.namespace(model="auth/model")
    toks = wire.tokens(64, seed=1)
    payloads = wire.random_blocks(ns, 64, seed=1)
    header = pb.PutHeader(namespace=ns, token_ids=toks, block_count=len(payloads), session_id="s1", durable=True)
    resp = stub.Put(wire.put_stream(header, payloads), metadata=md(ALPHA), timeout=30)
    assert len(resp.stored) == 4
    return ns, toks, list(resp.keys), payloads


def _all_rpcs(stub, ns):
    keys = pb.KeyList(keys=[b"k" * 16])
    return {
        "Lookup": lambda m: stub.Lookup(pb.LookupRequest(namespace=ns, token_ids=[1, 2, 3]), metadata=m, timeout=10),
        "Put": lambda m: stub.Put(iter([pb.PutRequest(header=pb.PutHeader(namespace=ns, token_ids=[1]))]),
                                  metadata=m, timeout=10),
        "Get": lambda m: list(stub.Get(pb.GetRequest(keys=keys), metadata=m, timeout=10)),
        "Resume": lambda m: stub.Resume(pb.ResumeRequest(session_id="x"), metadata=m, timeout=10),
        "Prefetch": lambda m: stub.Prefetch(pb.PrefetchRequest(keys=keys), metadata=m, timeout=10),
        "DeleteSession": lambda m: stub.DeleteSession(pb.DeleteSessionRequest(session_id="x"), metadata=m, timeout=10),
        "Invalidate": lambda m: stub.Invalidate(pb.InvalidateRequest(model=pb.ModelRef(model="m")), metadata=m,
                                                timeout=10),
        "Stats": lambda m: stub.Stats(pb.StatsRequest(), metadata=m, timeout=10),
        "OpenArena": lambda m: stub.OpenArena(pb.OpenArenaRequest(), metadata=m, timeout=10),
        "PutShm": lambda m: stub.PutShm(pb.PutShmRequest(arena_id="0" * 32, header=pb.PutHeader(namespace=ns,
                                                                                             token_ids=[1])),
                                        metadata=m, timeout=10),
        "GetShm": lambda m: stub.GetShm(pb.GetShmRequest(arena_id="0" * 32, request=pb.GetRequest(keys=keys),
                                                         region=pb.ShmSlot(offset=0, length=1 << 20)),
                                        metadata=m, timeout=10),
        "GetIpc": lambda m: stub.GetIpc(pb.GetIpcRequest(arena_id="0" * 32, request=pb.GetRequest(keys=keys),
                                                         device_uuid="0" * 32), metadata=m, timeout=10),
        "ReleaseIpc": lambda m: stub.ReleaseIpc(pb.ReleaseIpcRequest(lease_id="0" * 32), metadata=m, timeout=10),
    }


def test_every_rpc_needs_a_known_token(secured):
    _, stub = secured
    rpcs = _all_rpcs(stub, wire.namespace())
    assert set(rpcs) == set(pb.DESCRIPTOR.services_by_name["KVCache"].methods_by_name)  # none forgotten
    for name, call in rpcs.items():
        for metadata in (None, md("tok-nobody"), (("authorization", ALPHA),)):  # no scheme: not a bearer token
            with pytest.raises(grpc.RpcError) as err:
                call(metadata)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, name
            assert "tok-" not in err.value.details()


def test_health_needs_no_token(secured):
    proc, _ = secured
    with grpc.insecure_channel(proc.target) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_stats_is_admin_only(secured):
    _, stub = secured
    with pytest.raises(grpc.RpcError) as err:
        stub.Stats(pb.StatsRequest(), metadata=md(ALPHA), timeout=10)
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert stub.Stats(pb.StatsRequest(), metadata=md(ADMIN), timeout=10).version


def test_a_token_cannot_name_another_tenant(secured, alpha_data):
    _, stub = secured
    ns = pb.Namespace()
    ns.CopyFrom(alpha_data[0])
    ns.tenant = "alpha"
    with pytest.raises(grpc.RpcError) as err:
        stub.Lookup(pb.LookupRequest(namespace=ns, token_ids=alpha_data[1]), metadata=md(BETA), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as err:
        stub.Resume(pb.ResumeRequest(tenant="alpha", session_id="s1"), metadata=md(BETA), timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def _tier_counters(stub):
    resp = stub.Stats(pb.StatsRequest(), metadata=md(ADMIN), timeout=10)
    return [(t.tier, t.blocks, t.hits, t.misses, t.promotions, t.demotions) for t in resp.tiers]


def test_another_tenants_blocks_behave_as_misses_and_do_not_move(secured, alpha_data):
    _, stub = secured
    ns, toks, keys, payloads = alpha_data
    unknown = [bytes([i]) * 16 for i in range(1, 5)]
    before = _tier_counters(stub)

    def as_beta(chain):
        look = stub.Lookup(pb.LookupRequest(namespace=ns, keys=chain), metadata=md(BETA), timeout=10)
        got = wire.collect_get(stub.Get(pb.GetRequest(keys=pb.KeyList(keys=chain)), metadata=md(BETA), timeout=10))
        pre = stub.Prefetch(pb.PrefetchRequest(keys=pb.KeyList(keys=chain), wait=True), metadata=md(BETA), timeout=10)
        return (look.cached_blocks, look.cached_tokens, list(look.tiers), list(look.keys) == chain,
                len(got.blocks), got.end.reason, got.end.stopped_at, pre.blocks, pre.ready_blocks)

    assert as_beta(keys) == as_beta(unknown) == (0, 0, [], True, 0, "miss", 0, 4, 0)
    # same token ids, beta's own namespace: other keys altogether
    look = stub.Lookup(pb.LookupRequest(namespace=ns, token_ids=toks), metadata=md(BETA), timeout=10)
    assert look.cached_blocks == 0 and list(look.keys) != keys
    for call in (lambda: stub.Resume(pb.ResumeRequest(session_id="s1"), metadata=md(BETA), timeout=10),
                 lambda: list(stub.Get(pb.GetRequest(session_id="s1"), metadata=md(BETA), timeout=10)),
                 lambda: stub.DeleteSession(pb.DeleteSessionRequest(session_id="s1", erase_blocks=True),
                                            metadata=md(BETA), timeout=10)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert stub.Invalidate(pb.InvalidateRequest(model=pb.ModelRef(model="auth/model")), metadata=md(BETA),
                           timeout=10).blocks_deleted == 0
    assert stub.Invalidate(pb.InvalidateRequest(namespace=ns), metadata=md(BETA), timeout=10).blocks_deleted == 0
    # nothing of alpha's was read, promoted or dropped
    assert _tier_counters(stub) == before
    mine = wire.collect_get(stub.Get(pb.GetRequest(keys=pb.KeyList(keys=keys)), metadata=md(ALPHA), timeout=10))
    assert mine.blocks == payloads and mine.end.complete


def test_a_foreign_key_cuts_a_mixed_chain_like_a_miss(secured, alpha_data):
    _, stub = secured
    ns, _, alpha_keys, _ = alpha_data
    beta_ns = wire.namespace(model="auth/beta")
    payloads = wire.random_blocks(beta_ns, 32, seed=2)
    header = pb.PutHeader(namespace=beta_ns, token_ids=wire.tokens(32, seed=2), block_count=2)
    beta_keys = list(stub.Put(wire.put_stream(header, payloads), metadata=md(BETA), timeout=30).keys)
    chain = beta_keys + alpha_keys[:2]
    got = wire.collect_get(stub.Get(pb.GetRequest(keys=pb.KeyList(keys=chain)), metadata=md(BETA), timeout=10))
    assert got.blocks == payloads and (got.end.stopped_at, got.end.reason, got.end.complete) == (2, "miss", False)
    look = stub.Lookup(pb.LookupRequest(namespace=beta_ns, keys=chain), metadata=md(BETA), timeout=10)
    assert look.cached_blocks == 2


def test_admin_acts_for_the_tenant_it_names(secured, alpha_data):
    _, stub = secured
    resp = stub.Resume(pb.ResumeRequest(tenant="alpha", session_id="s1"), metadata=md(ADMIN), timeout=10)
    assert list(resp.keys) == alpha_data[2]
    with pytest.raises(grpc.RpcError) as err:  # no tenant named: the default tenant, which has no s1
        stub.Resume(pb.ResumeRequest(session_id="s1"), metadata=md(ADMIN), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


def test_python_clients_send_the_token(secured, alpha_data):
    proc, _ = secured
    with KVTierClient(proc.target, token=ALPHA, timeout=30) as kv:
        assert kv.resume("s1").keys  # tenant comes from the token
    with KVTierClient(proc.target, timeout=30) as anon, pytest.raises(KVTierClientError) as err:
        anon.resume("s1")
    assert err.value.code == grpc.StatusCode.UNAUTHENTICATED

    async def run():
        async with AsyncKVTierClient(proc.target, token=ADMIN, timeout=30) as kv:
            return await kv.stats()

    import asyncio
    assert asyncio.run(run()).tiers


def test_no_tokens_refuses_a_non_loopback_address(tmp_path):
    env = {**os.environ, **SMALL_STORE_ENV}
    env.pop("KVTIER_CONFIG", None)
    cmd = [sys.executable, "-m", "service", "serve", "--host", "0.0.0.0", "--port", "0",
           "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    assert "refusing to listen on 0.0.0.0 without authentication" in done.stdout + done.stderr


def test_no_tokens_on_loopback_says_so_once(server):
    assert server.log_text().count("UNAUTHENTICATED on loopback") == 1


# -- the Authenticator itself -------------------------------------------------------------------------
def test_authenticator_maps_tokens_and_rejects_the_rest():
    auth = Authenticator({"zq9": "t1"}, ["adm"])
    assert auth.authenticate([("authorization", "Bearer zq9")]) == Principal("t1")
    assert auth.authenticate([("authorization", "bearer  adm ")]) == Principal(None, admin=True)
    for metadata in ([], [("authorization", "Bearer ")], [("authorization", "Basic zq9")], [("x", "Bearer zq9")]):
        with pytest.raises(Unauthenticated):
            auth.authenticate(metadata)
    assert Authenticator().authenticate([]) is None and not Authenticator().enabled
    assert "zq9" not in repr(auth) and "adm" not in repr(auth)


def test_tokens_file_toml_and_json(tmp_path):
    toml = tmp_path / "t.toml"
    toml.write_text('admin_tokens = ["x"]\n[tokens]\n"s3cr3t" = "acme"\n')
    assert load_tokens_file(toml) == ({"s3cr3t": "acme"}, ["x"])
    bad = tmp_path / "t.json"
    bad.write_text('{"tokens": ["s3cr3t"]}')
    with pytest.raises(ValueError) as err:
        load_tokens_file(bad)
    assert "s3cr3t" not in str(err.value)
