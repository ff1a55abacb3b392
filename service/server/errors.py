"""The service's error types (one hierarchy: :class:`ServiceError`) and its one error boundary.

May import grpc, google.rpc/protobuf and ``tiering.errors`` only; every other server module takes its
error types from here.

Two families of errors reach the boundary, and one table maps both (``google.rpc.Status`` details via
grpcio-status, readable with ``grpc_status.rpc_status.from_call``):

=====================================  ======================  ====================================
raised                                 status                  details
=====================================  ======================  ====================================
``InvalidBlock``, ``DecodeError``      ``INVALID_ARGUMENT``    ``BadRequest`` naming the field
                                                               (``request`` for bytes that do not
                                                               parse, non-UTF-8 strings included)
``BlockNotFound``/``SessionNotFound``  ``NOT_FOUND``
``LayoutMismatch``                     ``FAILED_PRECONDITION``
``CapacityExceeded``                   ``RESOURCE_EXHAUSTED``  ``QuotaFailure`` ``kvtier:capacity``
``TierUnavailable``                    ``UNAVAILABLE``
:class:`ServiceError` subclasses       their ``code``          ``QuotaFailure`` naming the limit for
                                                               :class:`QuotaExceeded`
anything else                          ``INTERNAL``            none (logged once, with traceback)
=====================================  ======================  ====================================

Statuses gRPC produces by itself are left alone: an over-size message is ``RESOURCE_EXHAUSTED``, an
expired deadline ``DEADLINE_EXCEEDED``, a call to a draining server ``UNAVAILABLE``.

Logging: a mapped error is the caller's condition and is logged once, without traceback, at INFO
(WARNING for ``RESOURCE_EXHAUSTED`` and ``UNAVAILABLE``, which operators size or fix); anything else
is a bug, logged once at ERROR with its traceback and answered ``INTERNAL`` with a generic message.

:class:`ErrorBoundary` is the one server interceptor that applies all this to the KVCache service
(health and reflection pass through it untouched), and also admits KVCache RPCs against
``max_concurrent`` so that health checks, which it never counts, always answer.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from kvtier.tiering.errors import (BlockNotFound, CapacityExceeded, InvalidBlock, KVTierError, LayoutMismatch,
                                   TierUnavailable)

log = logging.getLogger(__name__)


# -- the service's own errors ------------------------------------------------------------------------
class ServiceError(Exception):
    """Base of every error the service (not the engine) raises on purpose; ``code`` is its status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class Unauthenticated(ServiceError):
    """No credentials, or credentials this server does not know."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(ServiceError):
    """Known caller, but not allowed to do this."""

    code = grpc.StatusCode.PERMISSION_DENIED


class QuotaExceeded(ServiceError):
    """A per-request, per-caller or server-wide limit was hit (``service/server/quota.py``).

    :ivar subject: the ``QuotaFailure.Violation.subject`` naming the limit, e.g.
        ``tenant:acme:cold_bytes`` or ``server:put_pending_bytes``.
    """

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, *, subject: str) -> None:
        super().__init__(message)
        self.subject = subject


class ShmUnavailable(ServiceError):
    """Shared memory is off on this server, or the arena named is not the caller's (or is gone); the
    client falls back to the gRPC streams."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class IpcUnavailable(ShmUnavailable):
    """This server cannot hand this caller CUDA IPC handles (no CUDA hot tier, another device, another
    user); the caller fetches the blocks with ``GetShm`` or ``Get``."""


class UploadNotFound(ServiceError):
    """No unfinished multi-piece ``PutShm`` with this id on this arena (finished, expired, never started)."""

    code = grpc.StatusCode.NOT_FOUND


class LeaseNotFound(ServiceError):
    """No CUDA IPC lease with this id for this caller (released, expired or never granted)."""

    code = grpc.StatusCode.NOT_FOUND


class Unimplemented(ServiceError):
    """A method this server does not serve (an unknown method id on the same-host socket)."""

    code = grpc.StatusCode.UNIMPLEMENTED


class Draining(ServiceError):
    """The server is shutting down: calls in flight finish, new ones are refused (as gRPC refuses them)."""

    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(ServiceError):
    """The caller's deadline passed while its same-host socket call ran (gRPC answers its own calls so)."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


class DataLoss(ServiceError):
    """Stored bytes failed their check on their way to the caller (none of them reached it as a result)."""

    code = grpc.StatusCode.DATA_LOSS


class StreamIdle(ServiceError):
    """A request stream sent nothing for longer than the server's idle timeout; it was closed."""

    code = grpc.StatusCode.DEADLINE_EXCEEDED


# -- the mapping -------------------------------------------------------------------------------------
#: Engine error class -> status code, most specific first (SessionNotFound is a BlockNotFound).
_ENGINE_CODES: tuple[tuple[type[KVTierError], grpc.StatusCode], ...] = (
    (InvalidBlock, grpc.StatusCode.INVALID_ARGUMENT),
    (BlockNotFound, grpc.StatusCode.NOT_FOUND),
    (LayoutMismatch, grpc.StatusCode.FAILED_PRECONDITION),
    (CapacityExceeded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (TierUnavailable, grpc.StatusCode.UNAVAILABLE),
)
#: Codes of conditions operators act on (a limit to size, a tier to fix): logged at WARNING.
_WARN_CODES = frozenset({grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.UNAVAILABLE})


def _pack(msg) -> any_pb2.Any:
    detail = any_pb2.Any()
    detail.Pack(msg)
    return detail


def code_of(exc: BaseException) -> grpc.StatusCode | None:
    """The status code of an error raised on purpose (module table), ``None`` for a bug."""
    if isinstance(exc, ServiceError):
        return exc.code
    if isinstance(exc, DecodeError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return next((c for cls, c in _ENGINE_CODES if isinstance(exc, cls)), None)


def status_for(exc: BaseException) -> grpc.Status:
    """The gRPC status (with ``google.rpc`` details) that answers ``exc``: :func:`status_proto` as gRPC
    sends it. Pure: does not log."""
    return rpc_status.to_status(status_proto(exc))


def status_proto(exc: BaseException) -> status_pb2.Status:
    """The ``google.rpc.Status`` (code, message, details) that answers ``exc`` (module table).

    Pure: does not log. Unknown exceptions give ``INTERNAL`` with a generic message, so internals
    never leak to callers. The same-host socket path (``service/server/shm_control.py``) sends it as is.
    """
    code = code_of(exc)
    if code is None:
        return status_pb2.Status(code=code_pb2.INTERNAL, message="internal error; see the server log")
    message = str(exc) or type(exc).__name__
    details = []
    if isinstance(exc, (InvalidBlock, DecodeError)):
        field = (exc.field or "") if isinstance(exc, InvalidBlock) else "request"
        if isinstance(exc, DecodeError):
            message = f"malformed request message: {message}"
        details.append(_pack(error_details_pb2.BadRequest(field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=field, description=message)])))
    elif isinstance(exc, (QuotaExceeded, CapacityExceeded)):
        details.append(_pack(error_details_pb2.QuotaFailure(violations=[
            error_details_pb2.QuotaFailure.Violation(subject=getattr(exc, "subject", "kvtier:capacity"),
                                                     description=message)])))
    # grpc.StatusCode values are (int, name) pairs; google.rpc.Status wants the int.
    return status_pb2.Status(code=code.value[0], message=message, details=details)


def log_error(method: str, exc: BaseException) -> None:
    """Log ``exc``, answered for RPC ``method``, once: see the module docstring for the levels."""
    code = code_of(exc)
    if code is None:
        log.error("%s failed with an unexpected error; answered INTERNAL", method, exc_info=exc)
        return
    field = f" ({exc.field})" if isinstance(exc, InvalidBlock) and exc.field else ""
    log.log(logging.WARNING if code in _WARN_CODES else logging.INFO, "%s: %s%s: %s", method, code.name, field,
            exc)


# -- the boundary ------------------------------------------------------------------------------------
class _Malformed:
    """Stands in for a unary request whose bytes did not parse; the boundary answers its error."""

    __slots__ = ("error",)

    def __init__(self, error: DecodeError) -> None:
        self.error = error


#: (attribute of a method handler, factory of such a handler), one per RPC kind.
_KINDS = (("unary_unary", grpc.unary_unary_rpc_method_handler),
          ("unary_stream", grpc.unary_stream_rpc_method_handler),
          ("stream_unary", grpc.stream_unary_rpc_method_handler),
          ("stream_stream", grpc.stream_stream_rpc_method_handler))


class ErrorBoundary(grpc.aio.ServerInterceptor):
    """The one interceptor between gRPC and the KVCache handlers (install it as the server's only one).

    For every RPC of ``service`` it

    * admits the RPC against ``max_concurrent`` KVCache RPCs in flight (0 = no limit); one more is
      answered ``RESOURCE_EXHAUSTED`` with ``QuotaFailure`` ``server:concurrent_rpcs``. Health checks
      and reflection are not counted, so they answer however busy the service is;
    * parses a unary request itself, so bytes that do not parse are ``INVALID_ARGUMENT`` with
      ``BadRequest`` details (gRPC would answer a bare ``UNKNOWN``);
    * answers every error a handler raises as :func:`status_for` maps it, logged once (:func:`log_error`);
    * runs ``observers`` (telemetry: spans, latency) around all of that, so they see the mapped status.

    Other services' RPCs go straight to their handlers. Handlers of ``service`` are coroutines (unary
    responses) or async generators (streamed responses). Use it on the server's event loop.
    """

    def __init__(self, service: str, *, observers: Sequence[grpc.aio.ServerInterceptor] = (),
                 max_concurrent: int = 0) -> None:
        self._prefix = f"/{service}/"
        self._observers = tuple(observers)
        self.max_concurrent = max_concurrent
        self.in_flight = 0
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(self, continuation, handler_call_details):
        if not (handler_call_details.method or "").startswith(self._prefix):
            return await continuation(handler_call_details)

        async def guarded(details):
            handler = await continuation(details)
            if handler is None:
                return None
            cached = self._wrapped.get(details.method)
            if cached is None or cached[0] is not handler:  # registered handlers come back the same
                cached = self._wrapped[details.method] = (handler, self._wrap(handler, details.method))
            return cached[1]

        call = guarded
        for observer in reversed(self._observers):  # the first observer outermost
            call = (lambda obs, inner: lambda details: obs.intercept_service(inner, details))(observer, call)
        return await call(handler_call_details)

    def _wrap(self, handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
        deserializer = handler.request_deserializer
        if not handler.request_streaming and deserializer is not None:
            parse = deserializer

            def deserializer(raw: bytes):
                try:
                    return parse(raw)
                except DecodeError as exc:
                    return _Malformed(exc)
        for attr, make in _KINDS:
            behavior = getattr(handler, attr)
            if behavior is not None:
                wrap = self._streamed if handler.response_streaming else self._unary
                return make(wrap(behavior, method), request_deserializer=deserializer,
                            response_serializer=handler.response_serializer)
        return handler

    @contextlib.contextmanager
    def admitted(self):
        """Count one KVCache call in flight for the ``with`` body (gRPC's and the same-host socket's alike).

        :raises QuotaExceeded: ``server:concurrent_rpcs`` when ``max_concurrent`` are in flight already.
        """
        if self.max_concurrent and self.in_flight >= self.max_concurrent:
            raise QuotaExceeded(f"{self.max_concurrent} KVCache calls are in flight, the most this server serves "
                                "at once (server.max_concurrent_rpcs); retry with backoff",
                                subject="server:concurrent_rpcs")
        self.in_flight += 1
        try:
            yield
        finally:
            self.in_flight -= 1

    async def _answer(self, context: grpc.aio.ServicerContext, method: str, exc: Exception) -> None:
        log_error(method, exc)
        if not context.done():  # a caller that hung up gets no answer (and abort would fail)
            await context.abort_with_status(status_for(exc))

    @contextlib.asynccontextmanager
    async def _guard(self, request, context: grpc.aio.ServicerContext, method: str):
        """Admit the call, run the ``with`` body, and answer whatever it raises (module docstring)."""
        try:
            if isinstance(request, _Malformed):
                raise request.error
            with self.admitted():
                yield
        except (grpc.aio.AbortError, grpc.aio.UsageError):
            raise
        except Exception as exc:  # noqa: BLE001 - the boundary: every error is answered here
            await self._answer(context, method, exc)

    def _unary(self, behavior: Callable, method: str) -> Callable:
        async def boundary(request, context):
            async with self._guard(request, context, method):
                return await behavior(request, context)
        return boundary

    def _streamed(self, behavior: Callable, method: str) -> Callable:
        async def boundary(request, context):
            responses = None
            try:
                async with self._guard(request, context, method):
                    responses = behavior(request, context)
                    async for response in responses:
                        yield response
            finally:
                if responses is not None:
                    await responses.aclose()  # run the handler's cleanup now, not at garbage collection
        return boundary
