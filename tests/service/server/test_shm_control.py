"""The same-host control path (service/server/shm_control.py) against real server processes, frames by hand.

Every hostile Put and Get of ``tests/fixtures/hostile.py``, sent as PutShm/GetShm over gRPC and over the
arena socket, gets the same code, message and details both ways; malformed frames (bad length, unknown
method, bad version, garbage protobuf, truncated, oversized) are answered precisely or close their own
connection, and the server stays up with other callers' data intact; a frame acts for the arena's
principal only, and stops when a SIGHUP removes that principal's tokens; the frame's timeout is the call's deadline; calls share the server's concurrency limit;
a server told ``shm_control = false`` offers no control; SIGTERM refuses new socket calls while in-flight
work finishes.
"""

from __future__ import annotations

import contextlib
import json
import signal
import threading
import time

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from kvtier.service.wire import control as wire
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2_grpc as pb_grpc
from tests.fixtures import hostile
from tests.fixtures.control import RawArena, status_of
from tests.fixtures.wire import collect_get, namespace, put_stream, random_blocks, tokens
from tests.service.server.test_token_reload import _hup

T = 30
#: The server's default ``max_message_bytes``: the largest gRPC message and control frame it takes.
MAX_MESSAGE_BYTES = 8 << 20
AUTH = {"KVTIER_SECURITY__TOKENS": json.dumps({"tok-a": "a", "tok-b": "b"})}


@pytest.fixture(scope="module")
def server(shared_server):
    return shared_server


@pytest.fixture(scope="module")
def kept(server):
    """A block of a tenant of its own, stored over gRPC before anything hostile runs: ``(keys, payloads)``."""
    with grpc.insecure_channel(server.target) as ch:
        header = pb.PutHeader(namespace=hostile.KEEP_NS, token_ids=hostile.KEEP_TOKS, block_count=3,
                              session_id="kept")
        keys = pb_grpc.KVCacheStub(ch).Put(put_stream(header, hostile.KEEP_PAYLOADS), timeout=T).keys
    return list(keys), hostile.KEEP_PAYLOADS


def assert_intact(target: str, kept) -> None:
    """The server answers, and the kept blocks come back byte-exact."""
    keys, payloads = kept
    with grpc.insecure_channel(target) as ch:
        got = collect_get(pb_grpc.KVCacheStub(ch).Get(pb.GetRequest(keys=pb.KeyList(keys=keys),
                                                                    tenant=hostile.KEEP_TENANT), timeout=T))
    assert got.blocks == payloads


def assert_gets_kept(raw: RawArena, kept) -> None:
    """A GetShm of the kept blocks over ``raw``'s socket answers all three."""
    req = pb.GetShmRequest(arena_id=raw.arena_id, request=pb.GetRequest(keys=pb.KeyList(keys=kept[0]),
                                                                        tenant=hostile.KEEP_TENANT),
                           region=pb.ShmSlot(offset=0, length=1 << 20))
    code, _, body = raw.call("GetShm", req.SerializeToString())
    assert code == grpc.StatusCode.OK and len(pb.GetShmResponse.FromString(body).blocks) == 3


def with_arena(body: bytes, method: str, raw: RawArena) -> bytes:
    """``body`` naming ``raw``'s arena (and, for a Get, the first MiB of it as its region)."""
    if method == "GetShm":
        return pb.GetShmRequest(arena_id=raw.arena_id, region=pb.ShmSlot(offset=0, length=1 << 20)
                                ).SerializeToString() + body
    return pb.PutShmRequest(arena_id=raw.arena_id).SerializeToString() + body


def test_the_server_offers_control(server):
    with RawArena(server.target) as raw:
        assert raw.control


@pytest.mark.parametrize("name,method,body", hostile.shm_bodies(), ids=[n for n, _, _ in hostile.shm_bodies()])
def test_hostile_table_answers_the_same_over_the_socket(server, kept, name, method, body):
    with RawArena(server.target) as raw:
        sent = with_arena(body, method, raw)
        over_grpc = raw.grpc_call(method, sent)
        if len(sent) > MAX_MESSAGE_BYTES:  # gRPC refuses the message, the socket the frame (then closes)
            with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                raw.send(wire.METHOD_IDS[method], sent)
            assert over_grpc[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert raw.reply()[1] == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
            return
        over_socket = raw.call(method, sent)
    assert over_socket == over_grpc
    assert over_socket[0] in {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                              grpc.StatusCode.RESOURCE_EXHAUSTED}, over_socket


def test_after_the_table_the_server_serves_and_data_is_intact(server, kept):
    assert_intact(server.target, kept)
    with grpc.insecure_channel(server.target) as ch:  # none of the bad Puts left a block
        kv = pb_grpc.KVCacheStub(ch)
        for ns, toks in hostile.PUT_TARGETS:
            assert kv.Lookup(pb.LookupRequest(namespace=ns, token_ids=toks), timeout=T).cached_blocks == 0


def bad_request_fields(details: bytes) -> list[str]:
    detail = any_pb2.Any.FromString(details)
    msg = error_details_pb2.BadRequest()
    assert detail.Unpack(msg)
    return [v.field for v in msg.field_violations]


def test_unknown_method_and_garbage_protobuf_keep_the_connection(server, kept):
    with RawArena(server.target) as raw:
        raw.send(9, b"", request_id=7)
        _method, code, rid, _body = raw.reply()
        assert (code, rid) == (grpc.StatusCode.UNIMPLEMENTED.value[0], 7)
        code, message, details = raw.call("GetShm", b"\x0a\xff\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT and message.startswith("malformed request message")
        assert bad_request_fields(details) == ["request"]
        code, message, details = raw.call("GetShm", pb.GetShmRequest(arena_id=raw.arena_id).SerializeToString(),
                                          timeout_s=-1.0)
        assert code == grpc.StatusCode.INVALID_ARGUMENT and bad_request_fields(details) == ["frame.timeout"]
        # the connection still serves: a real Get of the kept blocks
        assert_gets_kept(raw, kept)
    assert_intact(server.target, kept)


@pytest.mark.parametrize("frame,code,field", [
    (wire.REQUEST.pack(3, 2, wire.VERSION, 0, 5, 0.0), grpc.StatusCode.INVALID_ARGUMENT, "frame"),  # length < header
    (wire.REQUEST.pack(16, 2, 9, 0, 5, 0.0), grpc.StatusCode.INVALID_ARGUMENT, "frame"),  # unknown version
    (wire.REQUEST.pack(16, 2, wire.VERSION, 40, 5, 0.0), grpc.StatusCode.INVALID_ARGUMENT, "frame"),  # trace past it
    (wire.REQUEST.pack(64 << 20, 2, wire.VERSION, 0, 5, 0.0), grpc.StatusCode.RESOURCE_EXHAUSTED, None),  # oversized
], ids=["short-length", "bad-version", "trace-too-long", "oversized"])
def test_untrustworthy_frames_are_answered_then_closed(server, kept, frame, code, field):
    with grpc.insecure_channel(server.target) as ch:
        opened_before = dict(pb_grpc.KVCacheStub(ch).Stats(pb.StatsRequest(), timeout=T).counters)
    with RawArena(server.target) as raw:
        raw.sock.sendall(frame)
        _method, got, rid, body = raw.reply()
        assert (got, rid) == (code.value[0], 5)
        _code, message, details = status_of(got, body)
        if field is not None:
            assert bad_request_fields(details) == [field] and "malformed frame" in message
        else:
            quota = error_details_pb2.QuotaFailure()
            assert any_pb2.Any.FromString(details).Unpack(quota)
            assert quota.violations[0].subject == "server:max_message_bytes"
        assert raw.reply() is None  # then the server closed the connection (and dropped the arena)
    with grpc.insecure_channel(server.target) as ch:
        kv = pb_grpc.KVCacheStub(ch)
        end = time.monotonic() + T
        while kv.Stats(pb.StatsRequest(), timeout=T).counters["shm_arenas_reclaimed"] <= \
                opened_before.get("shm_arenas_reclaimed", 0):
            assert time.monotonic() < end
            time.sleep(0.05)
    assert_intact(server.target, kept)


def test_a_truncated_frame_ends_only_its_connection(server, kept):
    with RawArena(server.target) as other, RawArena(server.target) as raw:
        raw.sock.sendall(wire.REQUEST.pack(100, 2, wire.VERSION, 0, 1, 0.0) + b"\x0a\x20")  # 84 bytes short
        raw.sock.shutdown(2)
        assert_gets_kept(other, kept)
    assert_intact(server.target, kept)


def test_frames_act_only_for_the_arena_principal(kvtier_process):
    proc = kvtier_process("auth", extra_env=AUTH).start()
    with RawArena(proc.target, token="tok-a") as a, RawArena(proc.target, token="tok-b") as b:
        naming_a = pb.GetShmRequest(arena_id=a.arena_id, request=pb.GetRequest(session_id="s"),
                                    region=pb.ShmSlot(offset=0, length=4096)).SerializeToString()
        # b's socket naming a's arena: the answer b gets over gRPC with its own token, no more
        assert b.call("GetShm", naming_a) == b.grpc_call("GetShm", naming_a)
        assert b.call("GetShm", naming_a)[0] == grpc.StatusCode.FAILED_PRECONDITION
        # a's own socket acts for tenant a: another tenant's session is refused as over gRPC
        other_tenant = pb.GetShmRequest(arena_id=a.arena_id, request=pb.GetRequest(session_id="s", tenant="b"),
                                        region=pb.ShmSlot(offset=0, length=4096)).SerializeToString()
        assert a.call("GetShm", other_tenant) == a.grpc_call("GetShm", other_tenant)
        assert a.call("GetShm", other_tenant)[0] != grpc.StatusCode.OK
        assert a.call("GetShm", naming_a) == a.grpc_call("GetShm", naming_a)  # NOT_FOUND: no session s
        assert a.call("GetShm", naming_a)[0] == grpc.StatusCode.NOT_FOUND


def test_the_frame_timeout_is_the_call_deadline(server):
    with RawArena(server.target) as raw:
        ns = namespace(model="control/deadline")
        keys = []
        with grpc.insecure_channel(server.target) as ch:
            toks = tokens(16 * 8, seed=5)
            payloads = random_blocks(ns, len(toks), seed=5)
            header = pb.PutHeader(namespace=ns, token_ids=toks, block_count=8)
            keys = pb_grpc.KVCacheStub(ch).Put(put_stream(header, payloads), timeout=T).keys
        req = pb.GetShmRequest(arena_id=raw.arena_id, request=pb.GetRequest(keys=pb.KeyList(keys=keys)),
                               region=pb.ShmSlot(offset=0, length=4 << 20)).SerializeToString()
        code, _message, body = raw.call("GetShm", req, timeout_s=1e-6)
        # past its deadline a call is answered DEADLINE_EXCEEDED, or ends early saying so; never in full
        if code == grpc.StatusCode.OK:
            assert pb.GetShmResponse.FromString(body).end.reason == "deadline"
        else:
            assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        code, _message, body = raw.call("GetShm", req)  # the default timeout: the whole chain
        assert code == grpc.StatusCode.OK and pb.GetShmResponse.FromString(body).end.complete


def test_socket_calls_count_against_max_concurrent_rpcs(kvtier_process):
    proc = kvtier_process("limit", extra_env={"KVTIER_SERVER__MAX_CONCURRENT_RPCS": "1"}).start()
    ns = namespace(model="control/limit")
    toks = tokens(16 * 8, seed=6)
    with grpc.insecure_channel(proc.target) as ch:
        keys = pb_grpc.KVCacheStub(ch).Put(put_stream(pb.PutHeader(namespace=ns, token_ids=toks, block_count=8),
                                                      random_blocks(ns, len(toks), seed=6)), timeout=T).keys
    with RawArena(proc.target) as raw:
        req = pb.GetShmRequest(arena_id=raw.arena_id, request=pb.GetRequest(keys=pb.KeyList(keys=keys)),
                               region=pb.ShmSlot(offset=0, length=4 << 20)).SerializeToString()
        for rid in range(1, 17):  # sent at once: the second to arrive while the first runs is refused
            raw.send(wire.METHOD_IDS["GetShm"], req, request_id=rid)
        codes = {raw.reply()[1] for _ in range(16)}
    assert grpc.StatusCode.OK.value[0] in codes
    assert grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] in codes


def test_a_server_without_control_says_so(kvtier_process):
    proc = kvtier_process("nocontrol", extra_env={"KVTIER_SERVER__SHM_CONTROL": "false"}).start()
    with RawArena(proc.target) as raw:
        assert not raw.control
        raw.send(wire.METHOD_IDS["GetShm"], b"")
        raw.sock.settimeout(0.5)
        with pytest.raises(TimeoutError):  # frames are not read: the socket only keeps the arena alive
            raw.reply()


def test_sigterm_refuses_new_socket_calls_while_in_flight_work_finishes(kvtier_process):
    proc = kvtier_process("drain").start()
    ns = namespace(model="control/drain")
    toks = tokens(32, seed=9)
    payloads = random_blocks(ns, 32, seed=9)
    release = threading.Event()

    def held_back():  # a gRPC Put in flight keeps the server draining for its grace period
        msgs = put_stream(pb.PutHeader(namespace=ns, token_ids=toks, block_count=2), payloads)
        yield next(msgs)
        release.wait(T)
        yield from msgs

    with grpc.insecure_channel(proc.target) as ch, RawArena(proc.target) as raw:
        kv = pb_grpc.KVCacheStub(ch)
        put = kv.Put.future(held_back(), timeout=T)
        time.sleep(0.3)
        probe = pb.GetShmRequest(arena_id=raw.arena_id, request=pb.GetRequest(session_id="none"),
                                 region=pb.ShmSlot(offset=0, length=4096)).SerializeToString()
        assert raw.call("GetShm", probe)[0] == grpc.StatusCode.NOT_FOUND
        proc.proc.send_signal(signal.SIGTERM)
        end = time.monotonic() + 5
        while (code := raw.call("GetShm", probe)[0]) != grpc.StatusCode.UNAVAILABLE:
            assert code == grpc.StatusCode.NOT_FOUND and time.monotonic() < end, code
            time.sleep(0.05)
        release.set()
        assert len(put.result(timeout=T).stored) == 2
    assert proc.proc.wait(T) == 0


def test_a_socket_stops_acting_once_its_principal_has_no_token(kvtier_process, tmp_path):
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps({"tokens": {"tok-acme": "acme", "tok-other": "other"}}))
    proc = kvtier_process("revoke", extra_env={"KVTIER_SECURITY__TOKENS_FILE": str(tokens_file)}).start()
    with RawArena(proc.target, token="tok-acme") as raw:
        probe = pb.GetShmRequest(arena_id=raw.arena_id, request=pb.GetRequest(session_id="none"),
                                 region=pb.ShmSlot(offset=0, length=4096)).SerializeToString()
        assert raw.call("GetShm", probe)[0] == grpc.StatusCode.NOT_FOUND
        tokens_file.write_text(json.dumps({"tokens": {"tok-other": "other"}}))  # acme's only token goes
        assert "reloaded" in _hup(proc, 0)
        assert raw.call("GetShm", probe)[0] == grpc.StatusCode.UNAUTHENTICATED
        assert raw.grpc_call("GetShm", probe)[0] == grpc.StatusCode.UNAUTHENTICATED
