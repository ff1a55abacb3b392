"""CLIENT spans and W3C trace context of the clients' calls, when OpenTelemetry is configured.

Imports the OpenTelemetry API and grpc only (never the SDK: the application configures tracing). Every
kvtier call a client makes (gRPC streams, shared-memory and CUDA IPC control calls alike) goes through
:func:`start_call` and :func:`end` (``service/client/steps.py``), so:

* with a tracer provider installed (``trace.set_tracer_provider``), each call has a CLIENT span named
  ``kvtier.v1.KVCache/<Method>`` under the caller's current span, with the RPC semantic conventions'
  attributes (``rpc.system`` = ``grpc``, ``rpc.service``, ``rpc.method``, ``server.address``,
  ``server.port``, ``rpc.grpc.status_code``; status ERROR for any code but OK), and the global
  propagator writes that span's context (``traceparent``, ``tracestate``) into the call's metadata,
  so the server's span of the call joins the caller's trace;
* without one (OpenTelemetry's default no-op provider) nothing is created or injected: one ``None``
  test per call.

The provider is looked up once per client, when it is created (:func:`tracer`): install it first.
"""

from __future__ import annotations

import asyncio

import grpc
from opentelemetry import propagate, trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

#: Providers that record nothing: the API's defaults before an application installs one.
_NO_OP = (trace.ProxyTracerProvider, trace.NoOpTracerProvider)
#: (provider, its tracer or None), refreshed only when the global provider object changes.
_cached: tuple[object, trace.Tracer | None] = (None, None)


def tracer() -> trace.Tracer | None:
    """The clients' tracer from the global provider, or ``None`` while that provider is a no-op."""
    global _cached
    provider = trace.get_tracer_provider()
    if provider is not _cached[0]:
        _cached = (provider, None if isinstance(provider, _NO_OP) else provider.get_tracer("kvtier.client"))
    return _cached[1]


def peer_attributes(target: str) -> dict[str, str | int]:
    """``server.address`` / ``server.port`` (or ``network.transport`` = ``unix``) of a gRPC target."""
    if target.startswith(("unix:", "unix-abstract:")):
        path = target.split(":", 1)[1]
        return {"server.address": path[2:] if path.startswith("//") else path, "network.transport": "unix"}
    for prefix in ("dns:///", "ipv4:", "ipv6:"):
        if target.startswith(prefix):
            target = target[len(prefix):]
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit() or (":" in host and not host.startswith("[")):
        return {"server.address": target}
    return {"server.address": host.strip("[]"), "server.port": int(port)}


def start_call(tr: trace.Tracer | None, service: str, method: str, peer: dict,
               metadata) -> tuple[tuple | None, Span | None]:
    """The metadata to send with a call of ``service/method`` and its CLIENT span (``None``: not traced).

    :param tr: the client's :func:`tracer` (``None``: OpenTelemetry is not configured).
    :param peer: :func:`peer_attributes` of the channel's target.
    :param metadata: the client's own metadata (``None`` or pairs); returned unchanged when not traced.
    """
    if tr is None:
        return metadata, None
    span = tr.start_span(f"{service}/{method}", kind=SpanKind.CLIENT,
                         attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method, **peer})
    carrier: dict[str, str] = {}
    propagate.inject(carrier, context=trace.set_span_in_context(span))
    return (*(metadata or ()), *carrier.items()), span


def end(span: Span, exc: BaseException | None) -> None:
    """End a call's span with its status: ``exc`` is what the call raised (``None``: it succeeded)."""
    if exc is None:
        span.set_attribute("rpc.grpc.status_code", grpc.StatusCode.OK.value[0])
    else:
        code = _code_of(exc)
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        span.set_status(Status(StatusCode.ERROR, code.name))
    span.end()


def _code_of(exc: BaseException) -> grpc.StatusCode:
    code = getattr(exc, "code", None)
    if isinstance(code, grpc.StatusCode):  # KVTierClientError (a stream's block that failed its checksum)
        return code
    if callable(code):
        try:
            return code() or grpc.StatusCode.UNKNOWN
        except Exception:  # noqa: BLE001 - an error object that cannot say its code
            return grpc.StatusCode.UNKNOWN
    if isinstance(exc, (asyncio.CancelledError, GeneratorExit, KeyboardInterrupt)):
        return grpc.StatusCode.CANCELLED
    return grpc.StatusCode.UNKNOWN
