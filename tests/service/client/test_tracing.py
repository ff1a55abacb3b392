"""The clients join the caller's trace: application span → CLIENT span → the server's span, in one trace.

A real ``kvtier serve`` process exports its spans to an in-process OTLP receiver; the test's global
tracer provider exports the application's and the clients' spans to the same receiver. For the sync and
the asyncio client, over the gRPC streams and the shared-memory path (including the CUDA IPC control
call, refused by this CPU server), every server span of a call has the client's span as parent, and
that one the application's. Without a tracer provider the clients create and inject nothing.
"""

from __future__ import annotations

import asyncio
from unittest import mock

import grpc
import pytest
import torch

from kvtier.service.client import ipc as ipc_client
from kvtier.service.client import tracing
from kvtier.service.client.client import AsyncKVTierClient, KVTierClient
from kvtier.service.client.types import KVTierClientError
from kvtier.service.wire import cuda_ipc
from kvtier.tiering import BlockLayout, Namespace
from tests.fixtures.otlp import global_tracer_provider, serve_receiver, swapped_global_tracer_provider
from tests.fixtures.server import KVTierProcess

LAYOUT = BlockLayout("float16", layers=2, kv_heads=2, head_dim=32, block_tokens=16)
TOKENS = list(range(40))  # 2 full blocks + 8 tokens
SERVICE = "kvtier.v1.KVCache"
CLIENT_KIND = 3  # opentelemetry.proto.trace.v1.Span.SPAN_KIND_CLIENT
UUID = "GPU-00000000-0000-0000-0000-000000000000"
#: Server RPCs each client call makes, by data path (the link's OpenArena comes first on shm).
SERVER_CALLS = {"grpc": ["Put", "Get", "Resume", "Get"],
                "shm": ["OpenArena", "PutShm", "GetShm", "Resume", "GetIpc", "GetShm"]}


@pytest.fixture(scope="module")
def traced_server(tmp_path_factory):
    """A server process exporting every span to a receiver of this process: ``(receiver, endpoint, proc)``."""
    with serve_receiver() as (receiver, endpoint):
        proc = KVTierProcess(tmp_path_factory.mktemp("traced"), extra_env={
            "OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50"}).start()
        yield receiver, endpoint, proc
        proc.kill()


def blocks(seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(LAYOUT.shape(t), generator=gen).to(torch.float16) for t in (16, 16, 8)]


def meta_device():
    """``device="meta"`` stands for a CUDA device of this process: GetIpc is asked (and refused by the
    CPU server), then the blocks come the usual way and move with ``.to``."""
    return (mock.patch.object(ipc_client, "cuda_device", return_value=torch.device("meta")),
            mock.patch.object(cuda_ipc, "device_uuid", return_value=UUID))


def sync_calls(target: str, data_path: str, ns: Namespace) -> None:
    ipc, uuid = meta_device()
    with KVTierClient(target, timeout=30, data_path=data_path) as kv:
        put = kv.put(ns, TOKENS, blocks(1), session_id="conv")
        assert len(kv.get(session_id="conv")) == 3
        assert kv.resume("conv").tokens == 40
        with ipc, uuid:
            on_device = kv.get(put.keys, namespace=ns, device="meta")
        assert [b.device.type for b in on_device] == ["meta"] * 3


def async_calls(target: str, data_path: str, ns: Namespace) -> None:
    async def main():
        ipc, uuid = meta_device()
        async with AsyncKVTierClient(target, timeout=30, data_path=data_path) as kv:
            put = await kv.put(ns, TOKENS, blocks(2), session_id="conv")
            assert len(await kv.get(session_id="conv")) == 3
            assert (await kv.resume("conv")).tokens == 40
            with ipc, uuid:
                on_device = await kv.get(put.keys, namespace=ns, device="meta")
            assert [b.device.type for b in on_device] == ["meta"] * 3

    asyncio.run(main())


def attrs(span) -> dict:
    return {a.key: getattr(a.value, a.value.WhichOneof("value")) for a in span.attributes}


@pytest.mark.parametrize("data_path", ["grpc", "shm"])
@pytest.mark.parametrize("calls", [sync_calls, async_calls], ids=["sync", "async"])
def test_application_client_and_server_spans_share_one_trace(traced_server, calls, data_path):
    receiver, endpoint, proc = traced_server
    ns = Namespace("acme", f"trace/{calls.__name__}/{data_path}", "r1", LAYOUT)
    with global_tracer_provider(endpoint) as provider:
        with provider.get_tracer("app").start_as_current_span("app-request") as app:
            calls(proc.target, data_path, ns)
    trace_id = app.get_span_context().trace_id.to_bytes(16, "big")
    app_id = app.get_span_context().span_id.to_bytes(8, "big")
    expected = SERVER_CALLS[data_path]

    def server_spans(spans):
        return [s for s in spans if s.trace_id == trace_id and s.name.startswith(f"/{SERVICE}/")]

    spans = receiver.wait_for(lambda got: len(server_spans(got)) >= len(expected))
    mine = [s for s in spans if s.trace_id == trace_id]
    clients = {s.span_id: s for s in mine if s.kind == CLIENT_KIND}
    served = server_spans(spans)
    assert sorted(s.name for s in served) == sorted(f"/{SERVICE}/{m}" for m in expected), [s.name for s in mine]
    for server in served:
        client = clients[server.parent_span_id]  # each server span's parent is the client's span of that call
        assert client.name == server.name[1:] and client.parent_span_id == app_id
        a = attrs(client)
        assert (a["rpc.system"], a["rpc.service"], a["rpc.method"]) == ("grpc", SERVICE, client.name.split("/")[1])
        assert a["server.address"] == "127.0.0.1" and a["server.port"] == int(proc.target.rsplit(":", 1)[1])
        refused = client.name.endswith("/GetIpc")  # the CPU server answers FAILED_PRECONDITION
        code = grpc.StatusCode.FAILED_PRECONDITION if refused else grpc.StatusCode.OK
        assert a["rpc.grpc.status_code"] == code.value[0]
        assert client.status.code == (2 if refused else 0)  # STATUS_CODE_ERROR / UNSET


def test_a_failed_call_marks_its_client_span(traced_server):
    receiver, endpoint, proc = traced_server
    with global_tracer_provider(endpoint) as provider, KVTierClient(proc.target, data_path="grpc") as kv:
        with provider.get_tracer("app").start_as_current_span("app-miss") as app:
            with pytest.raises(KVTierClientError):
                kv.resume("no-such-session")
    trace_id = app.get_span_context().trace_id.to_bytes(16, "big")
    spans = receiver.wait_for(lambda got: any(s.trace_id == trace_id and s.name == f"/{SERVICE}/Resume" for s in got))
    client = next(s for s in spans if s.trace_id == trace_id and s.kind == CLIENT_KIND)
    assert attrs(client)["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0] and client.status.code == 2
    assert any(s.name == f"/{SERVICE}/Resume" and s.parent_span_id == client.span_id for s in spans)


def test_without_a_tracer_provider_nothing_is_created_or_injected(traced_server):
    _, _, proc = traced_server
    ns = Namespace("default", "trace/off", "r1", LAYOUT)
    with swapped_global_tracer_provider(None), \
            mock.patch.object(tracing.propagate, "inject", side_effect=AssertionError("injected")), \
            mock.patch.object(tracing.trace, "set_span_in_context", side_effect=AssertionError("span made")):
        assert tracing.tracer() is None
        for data_path in ("grpc", "shm"):
            with KVTierClient(proc.target, timeout=30, data_path=data_path) as kv:
                kv.put(ns, TOKENS, blocks(3), session_id=f"off-{data_path}")
                assert kv.get(session_id=f"off-{data_path}").complete


def test_peer_attributes_of_targets():
    assert tracing.peer_attributes("127.0.0.1:50051") == {"server.address": "127.0.0.1", "server.port": 50051}
    assert tracing.peer_attributes("[::1]:7") == {"server.address": "::1", "server.port": 7}
    assert tracing.peer_attributes("dns:///kv.internal:443") == {"server.address": "kv.internal", "server.port": 443}
    assert tracing.peer_attributes("unix:///tmp/kv.sock") == {"server.address": "/tmp/kv.sock",
                                                              "network.transport": "unix"}
    assert tracing.peer_attributes("kv.internal") == {"server.address": "kv.internal"}
