"""Every status code the server answers, produced by a real bad request over the wire.

After each, the server keeps serving and earlier data is intact. FAILED_PRECONDITION (``LayoutMismatch``)
cannot be reached over the wire: the wire carries raw bytes, whose size mismatch is an
``InvalidBlock``; the engine raises ``LayoutMismatch`` only for tensors of the wrong dtype/shape given
in-process. Its mapping (and the others') is checked directly on :func:`service.errors.status_for`.
"""

from __future__ import annotations

import threading

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from google.protobuf.message import DecodeError

from kvtier.service.server.errors import (IpcUnavailable, LeaseNotFound, PermissionDenied, QuotaExceeded,
                                          ShmUnavailable, StreamIdle, Unauthenticated, UploadNotFound, status_for)
from tests.fixtures.wire import (collect_get, details, header_maker, namespace, put_chunk, put_stream, random_blocks,
                                 stub, tokens)
from kvtier.tiering.codec import checksum
from kvtier.tiering.errors import (BlockNotFound, CapacityExceeded, InvalidBlock, LayoutMismatch, SessionNotFound,
                            TierUnavailable)

T = 30
NS = namespace(model="errors/model")
TOKS = tokens(40, seed=21)  # 3 blocks of 16 tokens, the last partial (8 tokens)
PAYLOADS = random_blocks(NS, 40, seed=21)


_header = header_maker(NS, TOKS, 3)
_chunk = put_chunk


def _well_formed(**kw):
    return list(put_stream(_header(**kw), PAYLOADS))


def _bad_puts():
    """(name, messages, field named by the BadRequest violation)."""
    good = _well_formed()
    wrong_sum = good[:-1] + [_chunk(2, 0, PAYLOADS[2], checksum(PAYLOADS[2]) ^ 1)]
    yield "starts with a chunk", good[1:], "header"
    yield "no model", [pb.PutRequest(header=_header(namespace=pb.Namespace(layout=NS.layout)))], \
        "header.namespace.model"
    yield "unknown dtype", [pb.PutRequest(header=_header(namespace=namespace(dtype="float64")))], \
        "header.namespace.layout.dtype"
    yield "no tokens", [pb.PutRequest(header=_header(token_ids=[]))], "header.token_ids"
    yield "too many blocks declared", [pb.PutRequest(header=_header(block_count=4))], "header.block_count"
    yield "first block past the end", [pb.PutRequest(header=_header(first_block=4, block_count=0))], \
        "header.first_block"
    yield "second header", good[:2] + [good[0]], "header"
    yield "block out of order", [good[0], _chunk(1, 0, PAYLOADS[1])], "chunk.block_index"
    yield "gap in offsets", [good[0], _chunk(0, 8, PAYLOADS[0][8:])], "chunk.offset"
    yield "block too long", [good[0], _chunk(0, 0, PAYLOADS[0] + b"x")], "chunk.data"
    yield "chunk over 1 MiB", [good[0], _chunk(0, 0, bytes((1 << 20) + 1))], "chunk.data"
    yield "checksum mismatch", wrong_sum, "chunk.checksum"
    yield "stream ends inside a block", good[:-1] + [_chunk(2, 0, PAYLOADS[2][:100])], "chunk.data"
    yield "fewer blocks than declared", list(put_stream(_header(block_count=3), PAYLOADS[:2])), "header.block_count"
    yield "more blocks than declared", list(put_stream(_header(block_count=2), PAYLOADS[:2])) + [good[-1]], \
        "chunk.block_index"
    yield "session id too long", [pb.PutRequest(header=_header(session_id="s" * 300))], "header.session_id"


@pytest.fixture(scope="module")
def kv(shared_server):
    channel, kv = stub(shared_server.target)
    with channel:
        yield kv


@pytest.fixture(scope="module")
def earlier(kv):
    """Data stored before the bad requests, checked intact after them."""
    ns = namespace(model="errors/earlier")
    toks = tokens(48, seed=22)
    payloads = random_blocks(ns, 48, seed=22)
    kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=toks, block_count=3, session_id="earlier"), payloads),
           timeout=T)
    return payloads


def _still_serving(kv, earlier):
    assert collect_get(kv.Get(pb.GetRequest(session_id="earlier"), timeout=T)).blocks == earlier
    look = kv.Lookup(pb.LookupRequest(namespace=NS, token_ids=TOKS), timeout=T)
    assert look.cached_blocks == 0, "a rejected Put left blocks behind"


@pytest.mark.parametrize("name,messages,field", list(_bad_puts()), ids=[c[0] for c in _bad_puts()])
def test_bad_put_is_invalid_argument_and_stores_nothing(kv, earlier, name, messages, field):
    with pytest.raises(grpc.RpcError) as err:
        kv.Put(iter(messages), timeout=T)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    violations = [v for d in details(err.value) if isinstance(d, error_details_pb2.BadRequest)
                  for v in d.field_violations]
    assert [v.field for v in violations] == [field], err.value.details()
    _still_serving(kv, earlier)


@pytest.mark.parametrize("request_,field", [
    (pb.GetRequest(), "target"),
    (pb.GetRequest(keys=pb.KeyList(keys=[b"short"])), "keys.keys[0]"),
    (pb.GetRequest(keys=pb.KeyList(keys=[bytes(16), bytes(16)])), "keys.keys[1]"),
    (pb.GetRequest(session_id="earlier", start_block=9), "start_block"),
    (pb.GetRequest(session_id="x", tenant="a\0b"), "tenant"),
], ids=["no target", "short key", "repeated key", "start past end", "NUL in tenant"])
def test_bad_get_is_invalid_argument(kv, earlier, request_, field):
    with pytest.raises(grpc.RpcError) as err:
        collect_get(kv.Get(request_, timeout=T))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert details(err.value)[0].field_violations[0].field == field
    _still_serving(kv, earlier)


def test_unknown_session_is_not_found(kv, earlier):
    for call in (lambda: collect_get(kv.Get(pb.GetRequest(session_id="nope"), timeout=T)),
                 lambda: kv.Resume(pb.ResumeRequest(session_id="nope"), timeout=T),
                 lambda: kv.Prefetch(pb.PrefetchRequest(session_id="nope"), timeout=T),
                 lambda: kv.DeleteSession(pb.DeleteSessionRequest(session_id="nope"), timeout=T)):
        with pytest.raises(grpc.RpcError) as err:
            call()
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert "nope" in err.value.details()
    _still_serving(kv, earlier)


def test_oversize_message_is_resource_exhausted(kv, earlier):
    msgs = [pb.PutRequest(header=_header()), _chunk(0, 0, bytes(9 << 20))]  # over the 8 MiB message limit
    with pytest.raises(grpc.RpcError) as err:
        kv.Put(iter(msgs), timeout=T)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    _still_serving(kv, earlier)


def test_stalled_put_hits_its_deadline_and_stores_nothing(kv, earlier):
    never = threading.Event()

    def stalls():
        msgs = iter(_well_formed())
        yield next(msgs)
        yield next(msgs)
        never.wait(5)

    with pytest.raises(grpc.RpcError) as err:
        kv.Put(stalls(), timeout=1.0)
    never.set()
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    _still_serving(kv, earlier)


def test_full_cold_tier_is_resource_exhausted_with_quota_failure(kvtier_process):
    proc = kvtier_process("tiny", extra_env={"KVTIER_STORE__COLD_CAPACITY": "2MiB"}).start()
    channel, kv = stub(proc.target)
    ns = namespace(dtype="float32", layers=12, kv_heads=8, head_dim=64, block_tokens=16)  # 1.5 MiB blocks
    toks = tokens(32, seed=23)
    with channel:
        with pytest.raises(grpc.RpcError) as err:
            kv.Put(put_stream(pb.PutHeader(namespace=ns, token_ids=toks, block_count=2, durable=True),
                              random_blocks(ns, 32, seed=23)), timeout=T)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert isinstance(details(err.value)[0], error_details_pb2.QuotaFailure)
        assert kv.Stats(pb.StatsRequest(), timeout=T).version
    assert proc.stop() == 0


@pytest.mark.parametrize("exc,code", [
    (InvalidBlock("bad", field="header.token_ids"), code_pb2.INVALID_ARGUMENT),
    (BlockNotFound("gone"), code_pb2.NOT_FOUND),
    (SessionNotFound("no session"), code_pb2.NOT_FOUND),
    (LayoutMismatch("float32 block in a float16 namespace"), code_pb2.FAILED_PRECONDITION),
    (CapacityExceeded("full"), code_pb2.RESOURCE_EXHAUSTED),
    (TierUnavailable("closed"), code_pb2.UNAVAILABLE),
    (QuotaExceeded("too many", subject="tenant:a:open_puts"), code_pb2.RESOURCE_EXHAUSTED),
    (Unauthenticated("who"), code_pb2.UNAUTHENTICATED),
    (PermissionDenied("admin only"), code_pb2.PERMISSION_DENIED),
    (ShmUnavailable("no arena"), code_pb2.FAILED_PRECONDITION),
    (IpcUnavailable("no cuda"), code_pb2.FAILED_PRECONDITION),
    (UploadNotFound("no upload"), code_pb2.NOT_FOUND),
    (LeaseNotFound("no lease"), code_pb2.NOT_FOUND),
    (StreamIdle("silent"), code_pb2.DEADLINE_EXCEEDED),
    (RuntimeError("secret internals"), code_pb2.INTERNAL),
])
def test_status_mapping(exc, code):
    status = status_for(exc)
    assert status.code.value[0] == code
    decoded = next(v for k, v in status.trailing_metadata if k == "grpc-status-details-bin")
    rpc = status_pb2.Status.FromString(decoded)
    assert rpc.code == code
    if code == code_pb2.INTERNAL:
        assert "secret" not in status.details  # internals stay in the server log
    else:
        assert status.details == str(exc)
    if isinstance(exc, InvalidBlock):
        bad = error_details_pb2.BadRequest()
        rpc.details[0].Unpack(bad)
        assert bad.field_violations[0].field == "header.token_ids"
    if code == code_pb2.RESOURCE_EXHAUSTED:
        quota = error_details_pb2.QuotaFailure()
        rpc.details[0].Unpack(quota)
        assert quota.violations[0].subject == getattr(exc, "subject", "kvtier:capacity")


def test_service_errors_are_one_hierarchy_apart_from_the_engine():
    from kvtier.service.server.errors import ServiceError
    from kvtier.tiering.errors import KVTierError

    for cls in (QuotaExceeded, Unauthenticated, PermissionDenied, ShmUnavailable, IpcUnavailable, UploadNotFound,
                LeaseNotFound, StreamIdle):
        assert issubclass(cls, ServiceError) and not issubclass(cls, KVTierError)


@pytest.mark.parametrize("method,kind,raw", [
    ("Lookup", "unary", b"\x0a\x05\x01"),
    ("Get", "server_stream", b"\x12\xff\x01"),
    ("Put", "client_stream", b"\xff\xff\xff\xff"),
])
def test_unparseable_requests_get_bad_request_details(shared_server, method, kind, raw):
    ident = lambda b: b  # noqa: E731
    path = f"/kvtier.v1.KVCache/{method}"
    with grpc.insecure_channel(shared_server.target) as ch:
        with pytest.raises(grpc.RpcError) as err:
            if kind == "unary":
                ch.unary_unary(path, request_serializer=ident, response_deserializer=ident)(raw, timeout=T)
            elif kind == "server_stream":
                list(ch.unary_stream(path, request_serializer=ident, response_deserializer=ident)(raw, timeout=T))
            else:
                ch.stream_unary(path, request_serializer=ident, response_deserializer=ident)(iter([raw]), timeout=T)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    [bad] = details(err.value)
    assert [v.field for v in bad.field_violations] == ["request"]


def test_decode_error_maps_to_bad_request():
    status = status_for(DecodeError("truncated"))
    assert status.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "malformed request message" in status.details


def test_a_client_error_is_logged_once_without_traceback(shared_server, kv):
    marker = "marker-dtype-31337"
    with pytest.raises(grpc.RpcError) as err:
        kv.Put(iter([pb.PutRequest(header=_header(namespace=namespace(dtype=marker)))]), timeout=T)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    lines = [line for line in shared_server.log_text().splitlines() if marker in line]
    assert len(lines) == 1 and " INFO " in lines[0] and "INVALID_ARGUMENT" in lines[0], lines
    assert "Traceback" not in shared_server.log_text()
