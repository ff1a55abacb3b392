"""Scenario 6, tracing: Get throughput of a server with OpenTelemetry traces on vs off.

Two warm servers run side by side: one with ``telemetry.traces`` on, exporting OTLP/gRPC to a sink
in this process (a ``TraceService`` that counts the spans it receives and drops them), one with
traces off. Rounds alternate between them (off, on, off, on...) so drift of a shared machine hits
both alike; each round is a run of sequential 360 KiB Gets with :class:`service.client.KVTierClient`.
The ratio is on/off of the summed throughput; the span count proves the traced server did trace.
If the telemetry module or the OTLP protobufs are missing the scenario says "not measured".
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from concurrent import futures

import grpc

from kvtier.service.client.client import KVTierClient

from kvtier.service.apps.bench import tiers
from kvtier.service.apps.bench.context import BenchContext, ratio, summarize, time_ops
from kvtier.service.apps.bench.procs import kvtier_server
from kvtier.service.apps.bench.transport import SIZES, namespace


@contextlib.contextmanager
def otlp_sink() -> Iterator[tuple[str, list[int]]]:
    """An OTLP/gRPC trace receiver on 127.0.0.1; yields ``(endpoint, [spans received])``."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    count = [0]

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        def Export(self, request, context):
            count[0] += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(2), options=[("grpc.max_receive_message_length", 64 << 20)])
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"http://127.0.0.1:{port}", count
    finally:
        server.stop(0.5)


def run(ctx: BenchContext) -> dict:
    """Rows ``{tracing, gbps, p50_ms, p99_ms, n}`` plus ``on_over_off`` and ``spans_exported``."""
    try:
        import kvtier.service.server.telemetry  # noqa: F401  (the server needs it to trace at all)
        from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc  # noqa: F401
    except ImportError as exc:
        return {"status": "not measured", "rows": [], "notes": [f"not measured: {exc}"]}
    layout = SIZES["360KiB"]
    ns = namespace(layout)
    data = tiers.payload(layout)
    size = data.nbytes
    rounds = 2 if ctx.tiny else 4 if ctx.quick else 8
    n = max(3, ctx.iterations(size) // rounds)
    lat = {"off": [], "on": []}
    with otlp_sink() as (endpoint, spans), contextlib.ExitStack() as stack:
        clients = {}
        for mode in ("off", "on"):
            tel = {"traces": "true", "otlp_endpoint": endpoint, "otlp_protocol": "grpc"} if mode == "on" \
                else {"traces": "false"}
            address = stack.enter_context(kvtier_server(ctx.workdir, f"tracing-{mode}", ctx.workdir / f"tracing-{mode}",
                                                        store=tiers.SETTINGS["warm"], telemetry=tel))
            client = stack.enter_context(KVTierClient(address, timeout=120))
            client.wait_ready(30)
            keys = [client.put(ns, tiers.block_tokens(layout, i), [data]).keys[0] for i in range(8)]
            clients[mode] = (client, keys)
        for r in range(rounds):
            for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
                ctx.step(f"round {r + 1}/{rounds}: tracing {mode}")
                client, keys = clients[mode]
                lat[mode] += time_ops(lambda i: client.get([keys[i % len(keys)]]), n)
        deadline = time.monotonic() + 10  # the batch processor exports every few seconds
        while spans[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        exported = spans[0]
    rows = [{"tracing": mode, **summarize(lat[mode], size)} for mode in ("off", "on")]
    notes = [f"{rounds} alternating rounds of {n} sequential 360 KiB Gets per server; "
             f"{exported} spans reached the in-process OTLP sink"]
    if exported == 0:
        notes.append("the traced server exported no spans: its tracing may not be working")
    return {"rows": rows, "notes": notes, "on_over_off": ratio(rows[1]["gbps"], rows[0]["gbps"]),
            "spans_exported": exported, "measured_at": "360 KiB Gets, warm"}
