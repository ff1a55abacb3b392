"""Traces of service.telemetry and the store's tier spans: tree shape, attributes, links, propagation,
and a real OTLP/gRPC receiver. Spans go to an in-memory exporter unless the test is about export."""

from __future__ import annotations

import asyncio
import logging
import time

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from kvtier.service.server.logs import LOG_FORMAT, TraceContextFilter
from kvtier.service.server.telemetry import client_interceptors, inject, setup_telemetry
from kvtier.tiering import BlockLayout, Namespace, StoreConfig, TieredStore
from kvtier.tiering.sessions import session_id_key
from kvtier.tiering.spans import session_hash
from tests.fixtures.otlp import otlp_receiver  # noqa: F401 - a fixture

LAYOUT = BlockLayout("float16", layers=2, kv_heads=2, head_dim=64, block_tokens=4)  # 4 KiB blocks
BLOCK = LAYOUT.block_bytes()
NS = Namespace("tenant-a", "m", "r", LAYOUT)
TOKENS = list(range(3 * LAYOUT.block_tokens))  # three full blocks
ALLOWED_ATTRS = {"kvtier.tier", "kvtier.blocks", "kvtier.bytes", "kvtier.hit", "kvtier.misses",
                 "kvtier.compression_ratio", "kvtier.to_tier", "kvtier.session", "kvtier.sessions",
                 "kvtier.evictions", "kvtier.blocks_requested", "kvtier.deadline_hit", "kvtier.busy_ns",
                 "kvtier.outlives_rpc", "rpc.system",
                 "rpc.service", "rpc.method", "rpc.grpc.status_code"}
OTEL_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_SDK_DISABLED",
             "OTEL_EXPORTER_OTLP_PROTOCOL", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_SERVICE_NAME",
             "OTEL_TRACES_SAMPLER", "OTEL_TRACES_SAMPLER_ARG")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for v in OTEL_VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


@pytest.fixture
def traced():
    exporter = InMemorySpanExporter()
    tel = setup_telemetry(None, span_exporter=exporter)
    yield tel, exporter
    tel.shutdown()


def cfg(data_dir: str, **kw) -> StoreConfig:
    base = dict(data_dir=data_dir, hot_device="cpu", hot_capacity=8 * BLOCK, warm_capacity=8 * BLOCK,
                warm_pin="off", cold_capacity=4 << 20, durable_sync=False, maintenance_s=0.05,
                compress_threads=1, prefetch_threads=2)
    base.update(kw)
    return StoreConfig(**base)


def payload(i: int) -> bytes:
    return bytes((i * 7 + j) % 5 for j in range(BLOCK))  # compressible, distinct per block


def cold_only_store(data_dir: str, tracer) -> TieredStore:
    """A store whose three blocks (and session "s1") live only in the cold tier (written, restarted)."""
    with TieredStore(cfg(data_dir)) as first:
        first.put(NS, TOKENS, [payload(i) for i in range(3)], session_id="s1", durable=True)
    return TieredStore(cfg(data_dir), tracer=tracer)


def by_name(spans, name):
    return [s for s in spans if s.name == name]


def one(spans, name):
    found = by_name(spans, name)
    assert len(found) == 1, f"{name}: {[s.name for s in spans]}"
    return found[0]


def wait_for(pred, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


# ----------------------------------------------------------------------------------------------------
def test_off_by_default_is_noop():
    tel = setup_telemetry(None)
    assert not tel.tracing and isinstance(tel.tracer, trace.NoOpTracer)
    with tel.tracer.start_as_current_span("x") as span:
        assert not span.is_recording()
    tel.shutdown()


def test_endpoint_env_turns_tracing_on(monkeypatch):
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    tel = setup_telemetry(None)
    try:
        assert tel.tracing
        res = tel.tracer_provider.resource.attributes
        assert res["service.name"] == "kvtier" and res["service.version"] and res["host.name"]
    finally:
        tel.tracer_provider.force_flush = lambda *a: True  # nothing listens on :9; do not wait for it
        tel.shutdown(timeout_s=0.1)
    monkeypatch.setenv("OTEL_SDK_DISABLED", "true")
    assert not setup_telemetry(None).tracing


def test_cold_read_tree_is_aggregated_per_tier(traced, data_dir):
    tel, exporter = traced
    with cold_only_store(data_dir, tel.tracer) as store:
        keys = store.lookup(NS, TOKENS).keys
        exporter.clear()
        with tel.tracer.start_as_current_span("request") as req:
            got = list(store.iter_blocks(keys))
        assert [t for _, _, t in got] == ["cold"] * 3
    spans = exporter.get_finished_spans()
    root = one(spans, "request")
    cold = one(spans, "kvtier.cold.read")  # one span for three blocks
    decode = one(spans, "kvtier.codec.decode")
    promote = one(spans, "kvtier.promote")
    assert cold.parent.span_id == root.context.span_id
    assert decode.parent.span_id == cold.context.span_id and promote.parent.span_id == cold.context.span_id
    assert cold.context.trace_id == req.get_span_context().trace_id
    assert cold.attributes["kvtier.tier"] == "cold" and cold.attributes["kvtier.hit"] is True
    assert cold.attributes["kvtier.blocks"] == 3 and cold.attributes["kvtier.bytes"] > 0
    assert decode.attributes["kvtier.compression_ratio"] > 1.0
    assert promote.attributes["kvtier.to_tier"] == "hot" and promote.attributes["kvtier.bytes"] == 3 * BLOCK
    for tier in ("hot", "warm"):  # the misses above the cold tier, one span each
        miss = one(spans, f"kvtier.{tier}.read")
        assert miss.attributes["kvtier.hit"] is False and miss.attributes["kvtier.misses"] == 3
    assert cold.start_time <= decode.start_time and decode.end_time <= cold.end_time
    # the envelope is not a duration: one event per block read carries that read's own duration
    reads = [e for e in cold.events if e.name == "cold.read"]
    assert len(reads) == 3 and all(e.attributes["kvtier.duration_ns"] > 0 for e in reads)
    assert cold.attributes["kvtier.busy_ns"] == sum(e.attributes["kvtier.duration_ns"] for e in reads)
    for s in spans:
        assert set(s.attributes) <= ALLOWED_ATTRS, s.name


def test_hot_hit_after_promotion(traced, data_dir):
    tel, exporter = traced
    with cold_only_store(data_dir, tel.tracer) as store:
        keys = store.lookup(NS, TOKENS).keys
        list(store.iter_blocks(keys))
        exporter.clear()
        with tel.tracer.start_as_current_span("request"):
            assert store.get(keys[0])[1] == "hot"
    spans = exporter.get_finished_spans()
    hot = one(spans, "kvtier.hot.read")
    assert hot.attributes["kvtier.hit"] is True and hot.attributes["kvtier.bytes"] == BLOCK
    assert not by_name(spans, "kvtier.cold.read")


def test_no_request_span_means_no_tier_spans(traced, data_dir):
    tel, exporter = traced
    with cold_only_store(data_dir, tel.tracer) as store:
        exporter.clear()
        list(store.iter_blocks(store.lookup(NS, TOKENS).keys))
    assert not [s for s in exporter.get_finished_spans() if s.name.endswith(".read")]


def test_lmdb_commit_is_linked_to_the_put(traced, data_dir):
    tel, exporter = traced
    with TieredStore(cfg(data_dir), tracer=tel.tracer) as store:
        with tel.tracer.start_as_current_span("put-request") as req:
            store.put(NS, TOKENS, [payload(i) for i in range(3)], session_id="s1")
        store.flush(5)
    commits = by_name(exporter.get_finished_spans(), "kvtier.lmdb.commit")
    linked = [c for c in commits if any(link.context.span_id == req.get_span_context().span_id for link in c.links)]
    assert linked, "no commit linked to the put"
    c = linked[0]
    assert c.parent is None  # its own trace: the put returned long before
    assert c.attributes["kvtier.tier"] == "cold" and c.attributes["kvtier.blocks"] == 3
    assert c.attributes["kvtier.compression_ratio"] > 1.0


def test_resume_prefetch_and_its_tier_reads_are_in_the_callers_trace(traced, data_dir):
    tel, exporter = traced
    with cold_only_store(data_dir, tel.tracer) as store:
        exporter.clear()
        timings = []
        store.on_timing = lambda what, s: timings.append(what)
        with tel.tracer.start_as_current_span("resume-request") as req:
            _, tiers, handle = store.resume("tenant-a", "s1")
        assert tiers == ["cold"] * 3 and handle.future.result(5) == 3
        assert wait_for(lambda: {"prefetch", "resume"} <= set(timings))
    spans = exporter.get_finished_spans()
    pre = one(spans, "kvtier.prefetch")
    ctx = req.get_span_context()
    assert pre.parent.span_id == ctx.span_id and pre.context.trace_id == ctx.trace_id  # a child, not a link
    assert pre.attributes["kvtier.outlives_rpc"] is True and not pre.links
    cold = one(spans, "kvtier.cold.read")
    assert cold.parent.span_id == pre.context.span_id and cold.attributes["kvtier.blocks"] == 3
    assert {s.context.trace_id for s in spans if s.name.startswith("kvtier.") and s.name != "kvtier.lmdb.commit"} \
        == {ctx.trace_id}
    root = one(spans, "resume-request")
    assert root.attributes["kvtier.session"] == session_hash(session_id_key("tenant-a", "s1"))
    assert "s1" not in root.attributes["kvtier.session"]


def test_log_records_carry_trace_ids(traced):
    tel, _ = traced
    records = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(self.format(record))

    handler = Keep()
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logger = logging.getLogger("kvtier.test.telemetry")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with tel.tracer.start_as_current_span("x") as span:
            logger.warning("inside")
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    ctx = span.get_span_context()
    assert f"trace_id={ctx.trace_id:032x} span_id={ctx.span_id:016x}" in records[0]
    assert "trace_id=" + "0" * 32 in records[1]


# ----------------------------------------------------------------------------------------------------
# the RPC span through a real grpc.aio server (generic handlers: the interceptor, not the servicer)
def _serve_and_call(tel, store, keys):
    async def get_blocks(request: bytes, context):
        parts = await asyncio.to_thread(lambda: list(store.iter_blocks(keys)))
        for _, block, tier in parts:
            yield tier.encode()

    async def fail(request: bytes, context):
        await context.abort(grpc.StatusCode.NOT_FOUND, "no such session")

    async def crash(request: bytes, context):
        await context.abort(grpc.StatusCode.INTERNAL, "disk on fire")

    async def main():
        server = grpc.aio.server(interceptors=tel.server_interceptors())
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler("kvtier.v1.KVCache", {
            "Get": grpc.unary_stream_rpc_method_handler(get_blocks),
            "Resume": grpc.unary_unary_rpc_method_handler(fail),
            "Stats": grpc.unary_unary_rpc_method_handler(crash)})])
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", interceptors=client_interceptors()) as ch:
                with tel.tracer.start_as_current_span("client-call") as client:
                    got = [r async for r in ch.unary_stream("/kvtier.v1.KVCache/Get")(b"")]
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary("/kvtier.v1.KVCache/Resume")(b"", metadata=inject())
                assert err.value.code() == grpc.StatusCode.NOT_FOUND
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await ch.unary_unary("/kvtier.v1.KVCache/Stats")(b"")
                assert err.value.code() == grpc.StatusCode.INTERNAL
            return client, got
        finally:
            await server.stop(None)

    return asyncio.run(asyncio.wait_for(main(), 20))


def test_rpc_span_continues_the_callers_trace(traced, data_dir):
    tel, exporter = traced
    with cold_only_store(data_dir, tel.tracer) as store:
        keys = store.lookup(NS, TOKENS).keys
        exporter.clear()
        client, got = _serve_and_call(tel, store, keys)
    assert got == [b"cold"] * 3
    spans = exporter.get_finished_spans()
    rpc = one(spans, "/kvtier.v1.KVCache/Get")
    assert rpc.kind == trace.SpanKind.SERVER
    assert rpc.context.trace_id == client.get_span_context().trace_id
    assert rpc.parent.span_id == client.get_span_context().span_id and rpc.parent.is_remote
    assert rpc.attributes["rpc.method"] == "Get" and rpc.attributes["rpc.grpc.status_code"] == 0
    assert one(spans, "kvtier.cold.read").parent.span_id == rpc.context.span_id
    failed = one(spans, "/kvtier.v1.KVCache/Resume")
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.NOT_FOUND.value[0]
    # a miss is the caller's business: the RPC semantic conventions leave the server span unset
    assert failed.status.status_code == trace.StatusCode.UNSET and not failed.events  # no AbortError noise
    crashed = one(spans, "/kvtier.v1.KVCache/Stats")
    assert crashed.status.status_code == trace.StatusCode.ERROR and crashed.status.description == "INTERNAL"
    samples = {(s.labels["method"], s.labels["code"]) for m in tel.registry.collect()
               if m.name == "kvtier_rpc_duration_seconds" for s in m.samples if s.name.endswith("_count")}
    assert {("Get", "OK"), ("Resume", "NOT_FOUND")} <= samples


# ----------------------------------------------------------------------------------------------------
# a real OTLP/gRPC receiver (tests/fixtures/otlp.py), configured only through OTEL_EXPORTER_OTLP_ENDPOINT
def test_otlp_grpc_export_reaches_a_receiver(otlp_receiver, data_dir, monkeypatch):
    receiver, endpoint = otlp_receiver
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint)
    tel = setup_telemetry(None)
    try:
        with cold_only_store(data_dir, tel.tracer) as store:
            with tel.tracer.start_as_current_span("request"):
                list(store.iter_blocks(store.lookup(NS, TOKENS).keys))
        assert wait_for(lambda: any(s.name == "kvtier.cold.read" for _, s in receiver.spans()))
    finally:
        tel.shutdown()
    resource, cold = next((r, s) for r, s in receiver.spans() if s.name == "kvtier.cold.read")
    attrs = {a.key: a.value for a in resource.attributes}
    assert attrs["service.name"].string_value == "kvtier"
    assert {a.key for a in cold.attributes} >= {"kvtier.tier", "kvtier.bytes", "kvtier.hit"}


# ----------------------------------------------------------------------------------------------------
# a real kvtier server PROCESS, traced through nothing but OTEL_EXPORTER_OTLP_ENDPOINT
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_server_process_exports_a_resume_trace(otlp_receiver, kvtier_process, traced):
    import urllib.request

    from tests.fixtures import wire
    from prometheus_client.parser import text_string_to_metric_families

    from kvtier.service.wire._gen.kvtier.v1 import kvtier_pb2 as pb

    receiver, endpoint = otlp_receiver
    tel, _ = traced  # the client's own tracer
    metrics_port = _free_port()
    proc = kvtier_process(extra_env={"OTEL_EXPORTER_OTLP_ENDPOINT": endpoint, "OTEL_BSP_SCHEDULE_DELAY": "50",
                                     "OTEL_TRACES_SAMPLER": "always_on",  # every root trace
                                     "KVTIER_TELEMETRY__METRICS_PORT": str(metrics_port)}).start()
    ns = wire.namespace()
    toks = wire.tokens(3 * ns.layout.block_tokens)
    header = pb.PutHeader(namespace=ns, session_id="chat-42", token_ids=toks, durable=True, block_count=3)
    channel, stub = wire.stub(proc.target)
    with channel, tel.tracer.start_as_current_span("client-put") as put_span:
        stub.Put(wire.put_stream(header, wire.random_blocks(ns, len(toks))), metadata=inject(), timeout=30)
    proc.restart()  # blocks now only on disk
    channel, stub = wire.stub(proc.target)
    with channel, tel.tracer.start_as_current_span("client-resume") as resume_span:
        stub.Resume(pb.ResumeRequest(session_id="chat-42"), metadata=inject(), timeout=30)
        got = wire.collect_get(stub.Get(pb.GetRequest(session_id="chat-42"), metadata=inject(), timeout=30))
    assert len(got.blocks) == 3
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        fams = {f.name: f for f in text_string_to_metric_families(resp.read().decode())}
    assert any(s.labels.get("method") == "Resume" for s in fams["kvtier_rpc_duration_seconds"].samples)
    assert proc.stop() == 0  # SIGTERM: the server flushes its spans on the way out

    spans = [s for _, s in receiver.spans()]
    names = {s.name for s in spans}
    tid = resume_span.get_span_context().trace_id.to_bytes(16, "big")
    resume = next(s for s in spans if s.name == "/kvtier.v1.KVCache/Resume")
    assert resume.trace_id == tid
    assert resume.parent_span_id == resume_span.get_span_context().span_id.to_bytes(8, "big")
    assert any(a.key == "kvtier.session" for a in resume.attributes)
    prefetch = [s for s in spans if s.name == "kvtier.prefetch" and s.parent_span_id == resume.span_id]
    assert prefetch and prefetch[0].trace_id == tid, f"no prefetch under Resume; spans: {sorted(names)}"
    reads = [s for s in spans if s.name == "kvtier.cold.read" and s.parent_span_id == prefetch[0].span_id]
    assert reads and reads[0].trace_id == tid
    commits = [s for s in spans if s.name == "kvtier.lmdb.commit"
               and any(l.trace_id == put_span.get_span_context().trace_id.to_bytes(16, "big") for l in s.links)]
    assert commits, "no lmdb commit linked to the Put's trace"
    resource = next(r for r, s in receiver.spans() if s.name == "/kvtier.v1.KVCache/Resume")
    assert {a.key: a.value.string_value for a in resource.attributes}["service.name"] == "kvtier"


def test_settings_select_http_exporter_and_service_name():
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    from kvtier.service.server.config import Settings
    from kvtier.service.server.telemetry import _make_exporter, tracing_requested

    settings = Settings(telemetry={"traces": True, "otlp_endpoint": "http://127.0.0.1:4318",
                                   "otlp_protocol": "http", "service_name": "kvtier-test"})
    assert tracing_requested(settings) and not tracing_requested(Settings())
    exporter = _make_exporter("http://127.0.0.1:4318", "http")
    assert isinstance(exporter, HttpExporter) and exporter._endpoint == "http://127.0.0.1:4318/v1/traces"
    exporter.shutdown()
    tel = setup_telemetry(settings)
    try:
        assert tel.tracer_provider.resource.attributes["service.name"] == "kvtier-test"
    finally:
        tel.tracer_provider.force_flush = lambda *a: True
        tel.shutdown(timeout_s=0.1)


# ----------------------------------------------------------------------------------------------------
# sampling and JSON logs (issue 14)
def test_default_sampler_follows_the_caller_and_samples_roots_by_ratio(monkeypatch):
    from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

    from kvtier.service.server.config import Settings

    monkeypatch.delenv("OTEL_TRACES_SAMPLER", raising=False)
    exporter = InMemorySpanExporter()
    tel = setup_telemetry(Settings(telemetry={"sample_ratio": 0.0}), span_exporter=exporter)
    try:
        assert "ParentBased" in tel.tracer_provider.sampler.get_description()
        with tel.tracer.start_as_current_span("root") as root:
            assert not root.is_recording()  # ratio 0: a request without a caller's trace is not traced
        for flags, recorded in ((TraceFlags.SAMPLED, True), (TraceFlags.DEFAULT, False)):
            parent = SpanContext(trace_id=0x1234, span_id=0x99, is_remote=True, trace_flags=TraceFlags(flags))
            ctx = trace.set_span_in_context(NonRecordingSpan(parent))
            with tel.tracer.start_as_current_span("child", context=ctx) as child:
                assert child.is_recording() is recorded  # the caller decides
    finally:
        tel.shutdown()
    assert Settings().telemetry.sample_ratio == 0.1  # the documented default


def test_json_log_lines_carry_trace_and_span_ids(traced):
    import io
    import json

    from kvtier.service.server.logs import JsonFormatter

    tel, _ = traced
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(TraceContextFilter())
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("kvtier.test.json")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        with tel.tracer.start_as_current_span("op") as span:
            logger.info("inside %s", "a span")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("outside")
    finally:
        logger.removeHandler(handler)
    inside, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    ctx = span.get_span_context()
    assert inside["message"] == "inside a span" and inside["level"] == "INFO" and inside["logger"] == "kvtier.test.json"
    assert (inside["trace_id"], inside["span_id"]) == (f"{ctx.trace_id:032x}", f"{ctx.span_id:016x}")
    assert outside["trace_id"] == "0" * 32 and "ValueError: boom" in outside["exception"]
