"""Telemetry: OpenTelemetry traces, trace-correlated logs and Prometheus metrics for the server.

One call sets it up; the server keeps the returned :class:`Telemetry` and asks it for the pieces::

    tel = setup_telemetry(settings)
    store = TieredStore(cfg, tracer=tel.tracer)
    server = grpc.aio.server(interceptors=tel.server_interceptors())
    tel.start_metrics(store)        # Prometheus /metrics, when settings.telemetry.metrics_port != 0
    ...
    tel.shutdown()                  # flushes the span queue, stops the /metrics server

Traces are on when ``settings.telemetry.traces`` is true or ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or
``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) is set, and ``OTEL_SDK_DISABLED`` is not ``true``. Otherwise
the tracer is OpenTelemetry's no-op tracer and the store's span code costs a context-variable read.
Everything else follows the standard ``OTEL_*`` variables: the exporter's endpoint, headers,
certificates and timeout, the sampler (``OTEL_TRACES_SAMPLER``/``_ARG``), the batch processor
(``OTEL_BSP_*``) and extra resource attributes (``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``).
``settings.telemetry.otlp_endpoint`` wins over the environment; the protocol is
``settings.telemetry.otlp_protocol`` unless ``OTEL_EXPORTER_OTLP[_TRACES]_PROTOCOL`` says otherwise.

Span naming scheme (one span per RPC, one per tier operation per RPC, never one per block):

==========================  =========================================================================
``/kvtier.v1.KVCache/<M>``   SERVER span of RPC ``<M>``, continuing the caller's W3C ``traceparent``
``kvtier.lookup``            longest-prefix lookup (``kvtier.blocks`` found)
``kvtier.store.put``         placing a put's blocks in memory
``kvtier.hot.read``          hot-tier hits of one request, aggregated
``kvtier.warm.read``         warm-tier hits of one request, aggregated
``kvtier.cold.read``         LMDB reads of one request; parent of the two below
``kvtier.codec.decode``      zstd decompression + unshuffle + checksum of those records
``kvtier.promote``           copying loaded blocks up to the top tier (child ``kvtier.h2d_copy`` on GPU)
``kvtier.prefetch``          background prefetch/resume; LINKED to the request that started it
``kvtier.lmdb.commit``       one cold-writer transaction; LINKED to every request in the batch
==========================  =========================================================================

Attributes: ``kvtier.tier``, ``kvtier.blocks``, ``kvtier.bytes``, ``kvtier.hit`` (all blocks hit),
``kvtier.misses``, ``kvtier.compression_ratio``, ``kvtier.session`` (a 16-hex-digit hash of tenant and
session id), ``rpc.method``, ``rpc.grpc.status_code``. Never payloads, keys, token ids or raw ids.

Sampling: parent-based. A request whose caller sent a sampled ``traceparent`` is traced, one whose
caller did not sample is not, and a request with no caller's trace starts one with probability
``settings.telemetry.sample_ratio`` (default 0.1). ``OTEL_TRACES_SAMPLER`` (and ``_ARG``) replace this.

Logs with ``trace_id``/``span_id``: ``service/server/logs.py``.

Client side: :func:`client_interceptors` for ``grpc.aio.insecure_channel(..., interceptors=...)``, or
:func:`inject` to add ``traceparent`` to hand-built metadata.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace

from kvtier.service import __version__

log = logging.getLogger(__name__)

_TRACE_ENDPOINT_VARS = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
#: Codes that mark a SERVER span as an error (OpenTelemetry RPC semantic conventions for gRPC); the
#: others (NOT_FOUND, INVALID_ARGUMENT, ...) are the caller's business and leave the status unset.
SERVER_ERROR_CODES = frozenset({grpc.StatusCode.UNKNOWN, grpc.StatusCode.DEADLINE_EXCEEDED,
                                grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.INTERNAL,
                                grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DATA_LOSS})


def tracing_requested(settings: Any | None) -> bool:
    """Whether traces are on for ``settings`` and the process environment (see module docstring)."""
    if os.environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    tel = getattr(settings, "telemetry", None)
    return bool(tel is not None and tel.traces) or any(os.environ.get(v) for v in _TRACE_ENDPOINT_VARS)


def _make_exporter(endpoint: str | None, protocol: str):
    env_proto = next((os.environ[v] for v in _PROTOCOL_VARS if os.environ.get(v)), None)
    if env_proto:
        protocol = "http" if env_proto.startswith("http") else "grpc"
    if protocol == "http":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        if endpoint and not endpoint.rstrip("/").endswith("/v1/traces"):
            endpoint = endpoint.rstrip("/") + "/v1/traces"
        return HttpExporter(endpoint=endpoint) if endpoint else HttpExporter()
    if protocol != "grpc":
        raise ValueError(f"otlp_protocol must be grpc or http, not {protocol!r}")
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    return GrpcExporter(endpoint=endpoint) if endpoint else GrpcExporter()


class Telemetry:
    """What :func:`setup_telemetry` built. Not thread-safe to set up or shut down; the pieces are.

    :ivar tracer: hand it to ``TieredStore(..., tracer=tel.tracer)``.
    :ivar tracer_provider: the SDK provider, or ``None`` when traces are off.
    :ivar registry: the Prometheus registry served on ``/metrics`` (one per instance, not the global).
    :ivar metrics_port: the port ``/metrics`` listens on once started, else ``None``.
    """

    def __init__(self, settings: Any | None, tracer_provider, tracer: trace.Tracer) -> None:
        from kvtier.service.server.metrics import KVTierMetrics

        tel = getattr(settings, "telemetry", None)
        self.settings = tel
        self.tracer_provider = tracer_provider
        self.tracer = tracer
        self.metrics = KVTierMetrics()
        self.registry = self.metrics.registry
        self.metrics_port: int | None = None
        self._metrics_server = None
        self._metrics_thread = None

    @property
    def tracing(self) -> bool:
        return self.tracer_provider is not None

    def server_interceptors(self) -> list[grpc.aio.ServerInterceptor]:
        """Interceptors for ``grpc.aio.server``: one that opens the RPC's server span (continuing the
        caller's ``traceparent``) and observes ``kvtier_rpc_duration_seconds``. The server runs it
        around its error boundary (``service/server/errors.py``), so it sees every mapped status.
        """
        return [ServerTelemetryInterceptor(self.tracer if self.tracing else None, self.metrics)]

    def start_metrics(self, store, *, port: int | None = None, host: str | None = None) -> int | None:
        """Serve Prometheus ``/metrics`` for ``store`` (read at scrape time: no cost on the data path).

        :param store: the open :class:`~tiering.store.TieredStore`.
        :param port: override ``settings.telemetry.metrics_port``; an explicit ``0`` picks a free port.
            Without an override, a settings port of 0 means metrics are off.
        :param host: override ``settings.telemetry.metrics_host`` (default 127.0.0.1).
        :returns: the bound port, or ``None`` when metrics are off.
        :raises OSError: if the port cannot be bound (the message names host and port).
        """
        if port is None:
            port = self.settings.metrics_port if self.settings is not None else 0
            if not port:
                return None
        if host is None:
            host = self.settings.metrics_host if self.settings is not None else "127.0.0.1"
        from prometheus_client import start_http_server

        try:
            self._metrics_server, self._metrics_thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
        self.metrics.attach(store)
        self.metrics_port = self._metrics_server.server_port
        log.info("metrics on http://%s:%d/metrics", host, self.metrics_port)
        return self.metrics_port

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Flush pending spans and stop the ``/metrics`` server. Idempotent."""
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
            self._metrics_server = None
        self.metrics.detach()
        if self.tracer_provider is not None:
            try:
                self.tracer_provider.force_flush(int(timeout_s * 1000))
            finally:
                self.tracer_provider.shutdown()
            self.tracer_provider = None


def default_sampler(settings: Any | None):
    """``ParentBased(TraceIdRatioBased(settings.telemetry.sample_ratio))``; without settings (embedders,
    tests with their own exporter) every root trace is kept. ``None`` (the SDK then builds the sampler
    ``OTEL_TRACES_SAMPLER``/``_ARG`` name) when that variable is set."""
    if os.environ.get("OTEL_TRACES_SAMPLER"):
        return None
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    tel = getattr(settings, "telemetry", None)
    return ParentBased(TraceIdRatioBased(tel.sample_ratio if tel is not None else 1.0))


def setup_telemetry(settings: Any | None = None, *, span_exporter=None, set_global: bool = False) -> Telemetry:
    """Build tracing (and the metrics registry) from ``settings`` and the ``OTEL_*`` environment.

    :param settings: the server's ``Settings`` (its ``telemetry`` section is read); ``None`` = defaults.
    :param span_exporter: an extra exporter (tests: ``InMemorySpanExporter``), exported synchronously;
        passing one turns tracing on.
    :param set_global: also install the provider as OpenTelemetry's global one (only the first call in
        a process can; tests leave it off).
    :returns: the :class:`Telemetry`; call :meth:`Telemetry.shutdown` on exit.
    :raises ValueError: on an unknown ``otlp_protocol``.
    """
    if not (tracing_requested(settings) or span_exporter is not None):
        return Telemetry(settings, None, trace.NoOpTracer())
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    tel = getattr(settings, "telemetry", None)
    attrs = {"service.version": __version__, "host.name": socket.gethostname()}
    if not os.environ.get("OTEL_SERVICE_NAME"):
        attrs["service.name"] = tel.service_name if tel is not None else "kvtier"
    provider = TracerProvider(resource=Resource.create(attrs), sampler=default_sampler(settings))
    if tracing_requested(settings):
        endpoint = tel.otlp_endpoint if tel is not None else None
        protocol = tel.otlp_protocol if tel is not None else "grpc"
        provider.add_span_processor(BatchSpanProcessor(_make_exporter(endpoint, protocol)))
        log.info("tracing on: OTLP/%s to %s", protocol,
                 endpoint or next((os.environ[v] for v in _TRACE_ENDPOINT_VARS if os.environ.get(v)), "default"))
    if span_exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(span_exporter))
    if set_global:
        trace.set_tracer_provider(provider)
    return Telemetry(settings, provider, provider.get_tracer("kvtier", __version__))


# ----------------------------------------------------------------------------------------------------
# server interceptor
def _status_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status the RPC ended with, as the context holds it. Errors are mapped once, by the error
    boundary inside this interceptor (``service/server/errors.py``), which sets the code of every
    error it answers; an error that arrives here without a code is the RPC's cancellation."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):  # grpc.aio reports the cython enum's integer value
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.CANCELLED


class ServerTelemetryInterceptor(grpc.aio.ServerInterceptor):
    """Server span per RPC (parented by the caller's W3C ``traceparent``), the latency histogram, and
    the token counters of Lookups by token ids (``kvtier_lookup_{query,hit}_tokens_total``).

    A span's status is ERROR only for the codes in :data:`SERVER_ERROR_CODES`; a NOT_FOUND session
    miss or an INVALID_ARGUMENT leaves it unset (``rpc.grpc.status_code`` still says which).

    Written here rather than taken from opentelemetry-instrumentation-grpc because its aio interceptor
    records the status only when ``abort``/``set_code`` go through its context proxy (an error
    interceptor outside it, or ``abort_with_status``, leaves the span at OK), records the ``AbortError``
    of every abort as an exception, and gives no hook for the Prometheus histogram.

    :param tracer: ``None`` when traces are off (then only the histogram is kept).
    """

    def __init__(self, tracer: trace.Tracer | None, metrics) -> None:
        self._tracer = tracer
        self._metrics = metrics

    async def intercept_service(self, continuation, handler_call_details):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        full = handler_call_details.method or ""
        method = full.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                self._wrap_unary(handler.unary_unary, full, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                self._wrap_unary(handler.stream_unary, full, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                self._wrap_stream(handler.unary_stream, full, method),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)
        return grpc.stream_stream_rpc_method_handler(
            self._wrap_stream(handler.stream_stream, full, method),
            request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)

    def begin(self, full: str, method: str, carrier: dict[str, str],
              attributes: dict[str, str] | None = None) -> "RpcObservation":
        """Start observing one call of ``method`` (full name ``full``): its SERVER span, a child of the
        caller's trace context in ``carrier`` (W3C ``traceparent``), attached to the current context
        until :meth:`RpcObservation.end`. The same-host socket path (``service/server/shm_control.py``)
        calls it directly, with ``attributes`` naming its transport.
        """
        if self._tracer is None:
            return RpcObservation(self._metrics, method, None, None)
        parent = propagate.extract(carrier)
        span = self._tracer.start_span(full, context=parent, kind=trace.SpanKind.SERVER,
                                       attributes={"rpc.system": "grpc", "rpc.service": "kvtier.v1.KVCache",
                                                   "rpc.method": method, **(attributes or {})})
        token = otel_context.attach(trace.set_span_in_context(span, parent))
        return RpcObservation(self._metrics, method, span, token)

    @contextlib.contextmanager
    def _observed(self, context, full: str, method: str):
        """One server span, duration and status for the call run inside (unary or streaming alike)."""
        carrier = {m.key: m.value for m in (context.invocation_metadata() or ()) if isinstance(m.value, str)}
        observation = self.begin(full, method, carrier)
        error = None
        try:
            yield
        except BaseException as exc:
            error = exc
            raise
        finally:
            observation.end(_status_code(context, error), error)

    def _wrap_unary(self, behavior: Callable, full: str, method: str):
        async def wrapper(request, context):
            with self._observed(context, full, method):
                response = await behavior(request, context)
                if method == "Lookup" and getattr(request, "token_ids", None):
                    self._metrics.observe_lookup(len(request.token_ids), response.cached_tokens)
                return response

        return wrapper

    def _wrap_stream(self, behavior: Callable, full: str, method: str):
        async def wrapper(request, context):
            with self._observed(context, full, method):
                async for item in behavior(request, context):
                    yield item

        return wrapper


class RpcObservation:
    """One call being observed (:meth:`ServerTelemetryInterceptor.begin`); :meth:`end` it exactly once."""

    __slots__ = ("_metrics", "_method", "_t0", "_span", "_token")

    def __init__(self, metrics, method: str, span, token) -> None:
        self._metrics, self._method, self._span, self._token = metrics, method, span, token
        self._t0 = time.perf_counter()

    def end(self, code: grpc.StatusCode, error: BaseException | None = None) -> None:
        """Record the call's duration and status ``code`` (``kvtier_rpc_duration_seconds``), set them on
        its span (ERROR for :data:`SERVER_ERROR_CODES`; ``error`` recorded unless it is gRPC's abort) and
        end the span, detaching its context."""
        self._metrics.observe_rpc(self._method, code.name, time.perf_counter() - self._t0)
        span = self._span
        if span is None:
            return
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in SERVER_ERROR_CODES:
            span.set_status(trace.Status(trace.StatusCode.ERROR, code.name))
        if code != grpc.StatusCode.OK and error is not None and type(error).__name__ != "AbortError":
            span.record_exception(error)
        span.end()
        otel_context.detach(self._token)


# ----------------------------------------------------------------------------------------------------
# client side
def inject(metadata: Sequence[tuple[str, str]] | None = None) -> list[tuple[str, str]]:
    """``metadata`` plus the current trace context (``traceparent``, ``tracestate``) as gRPC metadata."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return list(metadata or ()) + list(carrier.items())


class _ClientTraceInterceptor:
    """Adds the current ``traceparent`` to every call's metadata (no client spans of its own)."""

    @staticmethod
    def _details(details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        if not carrier:
            return details
        md = grpc.aio.Metadata(*(tuple(details.metadata or ())))
        for k, v in carrier.items():
            md[k] = v
        return grpc.aio.ClientCallDetails(details.method, details.timeout, md, details.credentials,
                                          details.wait_for_ready)


class _UnaryUnary(_ClientTraceInterceptor, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _UnaryStream(_ClientTraceInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):
        return await continuation(self._details(details), request)


class _StreamUnary(_ClientTraceInterceptor, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


class _StreamStream(_ClientTraceInterceptor, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):
        return await continuation(self._details(details), request_iterator)


def client_interceptors() -> list[grpc.aio.ClientInterceptor]:
    """Interceptors for ``grpc.aio.insecure_channel(target, interceptors=client_interceptors())`` that
    propagate the caller's current trace context (W3C ``traceparent``) to the kvtier server."""
    return [_UnaryUnary(), _UnaryStream(), _StreamUnary(), _StreamStream()]
