"""Validation at the door (service/server/door.py): an accepted request is always storable and answerable.

A session's record key (tenant, NUL, session id) over LMDB's 511 bytes is refused up front, naming the
field, while another tenant's Put in flight at the same moment is stored, survives a restart and is
served; 510/511-byte keys are stored durably. A Put whose chain no reply could name is refused before
anything is stored (no session, no blocks), and the longest chain accepted is answered by Put and Resume.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import error_details_pb2

from kvtier.service.server import door
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from tests.fixtures.wire import collect_get, details, namespace, put_stream, random_blocks, stub, tokens

T = 60


def _code(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as err:
        return err.code()
    return grpc.StatusCode.OK


def test_a_session_key_over_the_store_limit_is_refused_and_another_tenant_is_unharmed(kvtier_process):
    proc = kvtier_process("door").start()
    channel, kv = stub(proc.target)
    long_ns = namespace(model="door/long", tenant="t" * 256)
    other_ns = namespace(model="door/other", tenant="other-tenant")
    toks = tokens(48, seed=41)
    other_blocks = random_blocks(other_ns, 48, seed=41)
    results: dict[str, object] = {}
    start = threading.Barrier(2)

    def long_put():
        start.wait()
        try:
            kv.Put(put_stream(pb.PutHeader(namespace=long_ns, token_ids=toks, block_count=3, session_id="s" * 256),
                              random_blocks(long_ns, 48, seed=42)), timeout=T)
            results["long"] = grpc.StatusCode.OK
        except grpc.RpcError as err:
            results["long"] = err

    def other_put():
        start.wait()
        results["other"] = kv.Put(put_stream(pb.PutHeader(namespace=other_ns, token_ids=toks, block_count=3,
                                                          session_id="kept"), other_blocks), timeout=T)

    with channel:
        threads = [threading.Thread(target=long_put), threading.Thread(target=other_put)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(T)
        err = results["long"]
        assert isinstance(err, grpc.RpcError) and err.code() == grpc.StatusCode.INVALID_ARGUMENT
        [bad] = details(err)
        assert isinstance(bad, error_details_pb2.BadRequest)
        assert [v.field for v in bad.field_violations] == ["header.session_id"]
        assert "511" in err.details()
        assert len(results["other"].stored) == 3
        # nothing of the refused Put; reads of that key are refused the same way, never INTERNAL
        assert kv.Lookup(pb.LookupRequest(namespace=long_ns, token_ids=toks), timeout=T).cached_blocks == 0
        assert _code(lambda: kv.Resume(pb.ResumeRequest(tenant="t" * 256, session_id="s" * 256), timeout=T)) \
            == grpc.StatusCode.INVALID_ARGUMENT
        # the longest keys the store takes are stored for real (durable: committed to LMDB before the answer)
        for tenant, sid in (("t" * 256, "s" * 254), ("u" * 255, "s" * 254)):
            ns = namespace(model="door/edge", tenant=tenant)
            kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=toks, block_count=3, session_id=sid, durable=True),
                              random_blocks(ns, 48, seed=43)), timeout=T)
    assert proc.restart() == 0
    channel, kv = stub(proc.target)
    with channel:
        got = collect_get(kv.Get(pb.GetRequest(session_id="kept", tenant="other-tenant"), timeout=T))
        assert got.blocks == other_blocks and got.end.complete
        assert kv.Resume(pb.ResumeRequest(tenant="t" * 256, session_id="s" * 254), timeout=T).cached_blocks == 3
    assert "MDB_BAD_VALSIZE" not in proc.log_text() and "Traceback" not in proc.log_text()


def test_a_chain_no_reply_could_name_is_refused_and_leaves_nothing(shared_server):
    ns = namespace(model="door/chain", tenant="door-chain", block_tokens=1)
    most = door.max_chain_blocks(8 << 20)  # the server's default max_message_bytes
    too_long = [7] * (most + 1)
    channel, kv = stub(shared_server.target)
    with channel:
        payload = random_blocks(ns, 1, seed=44)
        with pytest.raises(grpc.RpcError) as err:
            kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=too_long, block_count=1, session_id="long"),
                              payload), timeout=T)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        [quota] = details(err.value)
        assert [v.subject for v in quota.violations] == ["request:chain_blocks"]
        # no session, no block
        assert _code(lambda: kv.Resume(pb.ResumeRequest(tenant="door-chain", session_id="long"), timeout=T)) \
            == grpc.StatusCode.NOT_FOUND
        assert kv.Lookup(pb.LookupRequest(namespace=ns, token_ids=too_long[:1]), timeout=T).cached_blocks == 0
        # the longest chain accepted is answered: by Put, and by Resume of its session
        longest = [7] * most
        put = kv.Put(iter([pb.PutRequest(header=pb.PutHeader(namespace=ns, token_ids=longest, block_count=0,
                                                             session_id="longest"))]), timeout=T)
        assert len(put.keys) == most
        resumed = kv.Resume(pb.ResumeRequest(tenant="door-chain", session_id="longest"), timeout=T)
        assert len(resumed.keys) == most
