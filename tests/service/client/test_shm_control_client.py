"""The clients' same-host control path (service/client/shm_control.py) against real server processes.

PutShm/GetShm go over the arena's socket by default (the server counts them), byte-exact; their errors
are the very ``KVTierClientError`` (code, message, details) gRPC gives for the same request; calls from
many threads and from many asyncio tasks share one socket; the calls join the caller's trace (server span
marked with its transport, tier spans under it, log lines with the trace id) and the RPC metrics; a
server without control support, or ``KVTIER_SHM_CONTROL=grpc``, keeps the calls on gRPC; a lost socket
is replaced by a new arena.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import urllib.request

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kvtier.service.client import shm_control
from kvtier.service.client.client import AsyncKVTierClient, KVTierClient
from kvtier.service.client.requests import client_error
from kvtier.service.client.types import KVTierClientError
from kvtier.service.wire import control as wire
from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb
from kvtier.tiering.keys import Namespace
from kvtier.tiering.layout import BlockLayout
from tests.fixtures.otlp import global_tracer_provider, serve_receiver
from tests.fixtures.server import KVTierProcess
from tests.service.server.test_shm import blocks_for, same_bytes, shm_counters

LAYOUT = BlockLayout("float16", 2, 2, 32, 16)  # 8 KiB blocks
AUTH = {"KVTIER_SECURITY__TOKENS": json.dumps({"tok-a": "a", "tok-b": "b"}),
        "KVTIER_SECURITY__ADMIN_TOKENS": json.dumps(["tok-admin"]), "KVTIER_SECURITY__MAX_BLOCKS_PER_REQUEST": "4"}
SERVICE = "kvtier.v1.KVCache"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = KVTierProcess(tmp_path_factory.mktemp("ctl-client"), extra_env=AUTH).start()
    yield proc
    proc.kill()


def round_trip(kv: KVTierClient, ns: Namespace, seed: int, n_tokens: int = 40) -> bool:
    tokens = list(range(seed * 1000, seed * 1000 + n_tokens))
    blocks = blocks_for(LAYOUT, n_tokens, seed=seed)
    put = kv.put(ns, tokens, blocks)
    got = kv.get(put.keys, namespace=ns)
    return got.complete and same_bytes(got.blocks, blocks)


def test_calls_go_over_the_socket_byte_exact(server):
    ns = Namespace("a", "ctl/round-trip", "r1", LAYOUT)
    before = shm_counters(server.target, token="tok-admin")
    with KVTierClient(server.target, token="tok-a", data_path="shm") as kv:
        assert round_trip(kv, ns, seed=1)
        assert kv._link(10).control is not None and kv._link(10).control.takes(pb.GetShmRequest())
    after = shm_counters(server.target, token="tok-admin")
    assert after["shm_control_calls"] - before.get("shm_control_calls", 0) == 2  # the PutShm and the GetShm
    assert after["shm_gets"] - before.get("shm_gets", 0) == 1


def both_ways(kv: KVTierClient, method: str, request) -> tuple[KVTierClientError, KVTierClientError]:
    """The errors of ``request`` over the link's socket and over gRPC (the same credentials)."""
    link = kv._link(10)
    with pytest.raises(KVTierClientError) as over_socket:
        link.control.start(request, method=method, timeout=10, trace={}).result()
    try:
        getattr(kv._stub, method)(request, timeout=10, metadata=kv._transport.metadata)
    except grpc.RpcError as exc:
        return over_socket.value, client_error(exc)
    raise AssertionError(f"{method} over gRPC succeeded")


def same_error(a: KVTierClientError, b: KVTierClientError) -> bool:
    return (a.code, a.details, [d.SerializeToString() for d in a.error_details]) == \
        (b.code, b.details, [d.SerializeToString() for d in b.error_details])


def test_errors_are_the_ones_grpc_gives(server):
    ns = Namespace("a", "ctl/errors", "r1", LAYOUT)
    with KVTierClient(server.target, token="tok-a", data_path="shm") as kv, \
            KVTierClient(server.target, token="tok-b", data_path="shm") as other:
        put = kv.put(ns, list(range(16 * 4)), blocks_for(LAYOUT, 16 * 4, seed=2))
        arena = kv._link(10).arena_id
        region = pb.ShmSlot(offset=0, length=1 << 20)
        bad_header = pb.PutHeader(namespace=pb.Namespace(model="m", layout=pb.BlockLayout(dtype="complex64")))
        cases = {
            "unknown arena": (kv, "GetShm", pb.GetShmRequest(arena_id="0" * 32, request=pb.GetRequest(session_id="s"),
                                                             region=region), grpc.StatusCode.FAILED_PRECONDITION),
            "another principal's arena": (other, "GetShm", pb.GetShmRequest(
                arena_id=arena, request=pb.GetRequest(session_id="s"), region=region),
                grpc.StatusCode.FAILED_PRECONDITION),
            "bad dtype": (kv, "PutShm", pb.PutShmRequest(arena_id=arena, header=bad_header),
                          grpc.StatusCode.INVALID_ARGUMENT),
            "unknown upload": (kv, "PutShm", pb.PutShmRequest(arena_id=arena, upload_id="nope"),
                               grpc.StatusCode.NOT_FOUND),
            "unknown session": (kv, "GetShm", pb.GetShmRequest(arena_id=arena, request=pb.GetRequest(session_id="s"),
                                                               region=region), grpc.StatusCode.NOT_FOUND),
            "another tenant": (kv, "GetShm", pb.GetShmRequest(
                arena_id=arena, request=pb.GetRequest(session_id="s", tenant="b"), region=region),
                grpc.StatusCode.INVALID_ARGUMENT),
            "over max_blocks_per_request": (kv, "GetShm", pb.GetShmRequest(
                arena_id=arena, request=pb.GetRequest(keys=pb.KeyList(keys=[k.digest for k in put.keys] + [b"k" * 16])),
                region=region), grpc.StatusCode.RESOURCE_EXHAUSTED),
        }
        for name, (client, method, request, code) in cases.items():
            over_socket, over_grpc = both_ways(client, method, request)
            assert same_error(over_socket, over_grpc), (name, over_socket, over_grpc)
            assert over_socket.code == code, (name, over_socket)
        assert cases and over_socket.error_details  # the last: QuotaFailure naming the limit
        _, _, bad, _ = cases["bad dtype"]
        assert both_ways(kv, "PutShm", bad)[0].field_violations  # BadRequest naming the field


def test_threads_and_tasks_share_one_socket(kvtier_process):
    """Gets of 1 to 8 blocks: up to 4 are served in place, more on a worker thread, so replies overtake."""
    server = kvtier_process("threads").start()
    ns = Namespace("default", "ctl/threads", "r1", LAYOUT)
    results: list[bool] = []
    with KVTierClient(server.target, data_path="shm") as kv:
        def worker(i: int) -> None:
            results.extend(round_trip(kv, ns, seed=100 + 10 * i + j, n_tokens=16 * (1 + (i + j) % 8)) for j in range(6))
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert kv._link(10).control.takes(pb.GetShmRequest())
    assert len(results) == 48 and all(results)

    async def main() -> list[bool]:
        async with AsyncKVTierClient(server.target, data_path="shm") as kv:
            async def one(i: int) -> bool:
                tokens = list(range(i * 1000, i * 1000 + 16 * (1 + i % 8) - i % 3))
                blocks = blocks_for(LAYOUT, len(tokens), seed=i)
                put = await kv.put(ns, tokens, blocks)
                got = await kv.get(put.keys, namespace=ns)
                return got.complete and same_bytes(got.blocks, blocks)
            return await asyncio.gather(*(one(500 + i) for i in range(32)))

    assert all(asyncio.run(main()))


def test_a_lost_socket_is_replaced_by_a_new_arena(server):
    ns = Namespace("a", "ctl/lost", "r1", LAYOUT)
    with KVTierClient(server.target, token="tok-a", data_path="shm") as kv:
        first = kv._link(10)
        first.control.close()  # as if the server had dropped it
        assert round_trip(kv, ns, seed=7)
        assert kv._link(10) is not first and kv._link(10).control is not None


def test_an_asyncio_client_recovers_when_the_server_closes_its_socket(server):
    ns = Namespace("a", "ctl/lost-async", "r1", LAYOUT)
    blocks = blocks_for(LAYOUT, 40, seed=8)

    async def main() -> bool:
        async with AsyncKVTierClient(server.target, token="tok-a", data_path="shm") as kv:
            put = await kv.put(ns, list(range(40)), blocks)
            first = kv._core.link
            # a frame the server cannot trust: it answers, then closes the connection (and drops the arena)
            first.control._sock.sendall(wire.REQUEST.pack(3, 2, wire.VERSION, 0, 0, 0.0))
            for _ in range(200):
                if not first.control.takes(pb.GetShmRequest()):
                    break
                await asyncio.sleep(0.01)
            assert not first.control.takes(pb.GetShmRequest())  # the reader saw the close
            got = await kv.get(put.keys, namespace=ns)  # over a new arena
            return got.complete and same_bytes(got.blocks, blocks) and kv._core.link is not first

    assert asyncio.run(main())


def test_trace_metrics_and_logs_of_socket_calls(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with serve_receiver() as (receiver, endpoint):
        proc = KVTierProcess(tmp_path, extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint,
                                                  "OTEL_BSP_SCHEDULE_DELAY": "50",
                                                  "KVTIER_TELEMETRY__METRICS_PORT": str(port)}).start()
        try:
            ns = Namespace("default", "ctl/trace", "r1", LAYOUT)
            with global_tracer_provider(endpoint) as provider:
                with provider.get_tracer("app").start_as_current_span("app") as app, \
                        KVTierClient(proc.target, data_path="shm") as kv:
                    put = kv.put(ns, list(range(40)), blocks_for(LAYOUT, 40, seed=3))
                    assert kv.get(put.keys).complete
                    with pytest.raises(KVTierClientError):
                        kv.get(session_id="no-such-session")
            trace_id = app.get_span_context().trace_id.to_bytes(16, "big")
            full = f"/{SERVICE}/GetShm"
            spans = receiver.wait_for(lambda got: sum(s.name == full and s.trace_id == trace_id for s in got) >= 2)
            mine = {s.span_id: s for s in spans if s.trace_id == trace_id}
            served = [s for s in mine.values() if s.name == full]
            assert len(served) == 2
            for span in served:
                attrs = {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}
                assert attrs["kvtier.transport"] == "unix-control" and attrs["rpc.method"] == "GetShm"
                client = mine[span.parent_span_id]  # the client's span of the call
                assert client.name == full[1:] and any(a.key == "kvtier.transport" for a in client.attributes)
            hit = next(s for s in served if any(a.key == "rpc.grpc.status_code" and a.value.int_value == 0
                                                for a in s.attributes))
            tiers = [s for s in receiver.wait_for(lambda got: any(x.parent_span_id == hit.span_id for x in got))
                     if s.parent_span_id == hit.span_id]
            assert tiers and all(s.name.startswith("kvtier.") for s in tiers)  # tier spans under the server span
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
                text = resp.read().decode()
            counts = {(s.labels.get("method"), s.labels.get("code")): s.value
                      for f in text_string_to_metric_families(text) for s in f.samples
                      if s.name == "kvtier_rpc_duration_seconds_count"}
            assert counts[("GetShm", "OK")] >= 1 and counts[("GetShm", "NOT_FOUND")] >= 1
            assert counts[("PutShm", "OK")] >= 1
        finally:
            proc.stop()
    lines = [ln for ln in proc.log_text().splitlines() if "GetShm: NOT_FOUND" in ln]
    assert lines and f"trace_id={trace_id.hex()}" in lines[0]


@pytest.mark.parametrize("how", ["server", "client"])
def test_calls_stay_on_grpc_without_control(kvtier_process, monkeypatch, how):
    env = {"KVTIER_SERVER__SHM_CONTROL": "false"} if how == "server" else {}
    if how == "client":
        monkeypatch.setenv(shm_control.ENV, "grpc")
    proc = kvtier_process(how, extra_env=env).start()
    ns = Namespace("default", "ctl/fallback", "r1", LAYOUT)
    with KVTierClient(proc.target, data_path="shm") as kv:
        assert round_trip(kv, ns, seed=4)
        assert kv._link(10).control is None
    counters = shm_counters(proc.target)
    assert counters["shm_gets"] == 1 and counters["shm_puts"] == 1 and not counters.get("shm_control_calls")


def test_a_large_request_goes_over_grpc(server):
    big = pb.PutShmRequest(header=pb.PutHeader(token_ids=[2**31] * 500_000))  # ~2.5 MiB of token ids
    with KVTierClient(server.target, token="tok-a", data_path="shm") as kv:
        control = kv._link(10).control
        assert control.takes(pb.PutShmRequest()) and not control.takes(big)
